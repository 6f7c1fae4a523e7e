"""A job's generation parameters: validated against a profile, resolved per item.

A job gives ``params={"difficulty": 50}`` (one value for every item) or a
list, ``{"difficulty": [1, 50, 100]}``: a **sweep**, where item ``i`` takes
``values[i % len(values)]``, so one job covers several settings with each
item's value a function of its index alone (like its seed). Parameters a job
does not give take the profile's default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from genimg.errors import ValidationError
from genimg.limits import short
from genimg.profiles.schema import check_value

if TYPE_CHECKING:
    from genimg.profiles.schema import ModelProfile

MAX_SWEEP_VALUES = 1_000
"""Most values one parameter's sweep list may hold."""


def resolve_params(profile: ModelProfile, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a job's parameters against ``profile`` and fill in defaults.

    Args:
        profile: the job's profile.
        given: ``{name: value or [values...]}``; ``None`` means all defaults.

    Returns:
        ``{name: value or list of values}`` for every parameter of the profile, in its order.

    Raises:
        ValidationError: ``field="params.NAME"`` for an unknown parameter, a wrong type, a
            non-finite or out-of-bounds value, or an empty or over-long sweep list;
            ``field="params"`` when ``given`` is not a mapping.
    """
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise ValidationError(f"must be a mapping of parameter names to values, got {short(given)}",
                              field="params")
    for name in given:
        if not isinstance(name, str) or name not in profile.params:
            takes = ", ".join(profile.params) or "no parameters"
            raise ValidationError(f"is not a parameter of profile {profile.name!r} (it takes {takes})",
                                  field=f"params.{short(name, 40) if not isinstance(name, str) else name[:64]}")
    out: dict[str, Any] = {}
    for name, spec in profile.params.items():
        field = f"params.{name}"
        value = given.get(name, spec.default)
        try:
            if isinstance(value, (list, tuple)):
                if not 1 <= len(value) <= MAX_SWEEP_VALUES:
                    raise ValueError(f"a sweep holds 1 to {MAX_SWEEP_VALUES:,} values, got {len(value):,}")
                out[name] = [check_value(spec, v, f"value {i}") for i, v in enumerate(value)]
            else:
                out[name] = check_value(spec, value, "value")
        except ValueError as e:
            raise ValidationError(str(e), field=field) from None
    return out


def item_params(params: Mapping[str, Any], item_index: int) -> dict[str, Any]:
    """The parameter values of one item: a sweep's ``values[item_index % len(values)]``."""
    return {n: (v[item_index % len(v)] if isinstance(v, list) else v) for n, v in params.items()}


def params_json(values: Mapping[str, Any]) -> str:
    """Canonical JSON of one item's parameters (sorted keys, no spaces): the index's ``params`` column."""
    return json.dumps(dict(values), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def batch_key(profile: ModelProfile, values: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of the shape-changing parameters: items with different keys never share a request."""
    return tuple(values[n] for n in profile.shape_params)


def parse_cli_param(text: str, profile: ModelProfile | None) -> tuple[str, Any]:
    """``key=value`` from the command line, the value typed by the profile's declaration.

    ``key=1,50,100`` is a sweep. Without a profile (or for an unknown key) the
    value is read as JSON when it parses, else kept as a string, so the
    validator names the field.

    Raises:
        ValidationError: ``field="param"`` when there is no ``=``.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValidationError(f"expected key=value, got {short(text)}", field="param")
    spec = profile.params.get(key) if profile is not None else None
    parts: Sequence[str] = raw.split(",") if "," in raw and (spec is None or spec.type != "str") else [raw]

    def one(s: str) -> Any:
        if spec is not None and spec.type == "str":
            return s
        if spec is not None and spec.type == "bool" and s.lower() in ("true", "false"):
            return s.lower() == "true"
        try:
            return json.loads(s)
        except ValueError:
            return s

    values = [one(p) for p in parts]
    return key, values if len(values) > 1 else values[0]
