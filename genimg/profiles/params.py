"""A job's generation parameters: validated against a profile, resolved per item.

A job gives ``params={"difficulty": 50}`` (one value for every item) or a
list, ``{"difficulty": [1, 50, 100]}``: a **sweep**, where item ``i`` takes
``values[i % len(values)]``, so one job covers several settings with each
item's value a function of its index alone (like its seed). Parameters a job
does not give take the profile's default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from genimg.errors import ValidationError

if TYPE_CHECKING:
    from genimg.profiles.schema import ModelProfile, ParamSpec

MAX_SAFE_INTEGER = 2**53 - 1
"""Largest int parameter: every JSON reader (JavaScript's numbers too) holds it exactly."""
MAX_SWEEP_VALUES = 1_000
"""Most values one parameter's sweep list may hold."""


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text):,} chars)"


def check_value(spec: ParamSpec, value: object, what: str) -> Any:
    """Return ``value`` (a float parameter's int as float) if it fits ``spec``; else raise ``ValueError``.

    Rules: the exact type (a bool is not an int, a str is not a number), finite
    numbers inside ``[min, max]``, str within ``max_chars`` and ``choices``.
    """
    kind = spec.type
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{what} must be a bool (true/false), got {_short(value)}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a str, got {_short(value)}")
        if len(value) > spec.max_chars:
            raise ValueError(f"{what} is {len(value):,} characters; the limit is {spec.max_chars}")
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"{what} must be one of {list(spec.choices)}, got {_short(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be {'an int' if kind == 'int' else 'a number'}, got {_short(value)}")
    if kind == "int" and not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    if kind == "int" and abs(value) > MAX_SAFE_INTEGER:
        raise ValueError(f"{what} must be within ±(2**53 - 1) (exact in every JSON reader), got {value}")
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        raise ValueError(f"{what} must be in [{spec.min}, {spec.max}], got {value}")
    return float(value) if kind == "float" else value


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
        raise ValidationError(f"must be a mapping of parameter names to values, got {_short(given)}",
                              field="params")
    for name in given:
        if not isinstance(name, str) or name not in profile.params:
            takes = ", ".join(profile.params) or "no parameters"
            raise ValidationError(f"is not a parameter of profile {profile.name!r} (it takes {takes})",
                                  field=f"params.{_short(name, 40) if not isinstance(name, str) else name[:64]}")
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
        raise ValidationError(f"expected key=value, got {_short(text)}", field="param")
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
