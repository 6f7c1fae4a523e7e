"""Prompt expansion (issue 15): templates and a served language model turn source texts into image prompts.

A job with ``expand`` does, for each *expansion unit* (a prompt, or an item
with ``per="item"``), with that unit's seed (the seed of its first item,
:func:`genimg.seeds.item_seeds`):

1. **Template** (:mod:`genimg.templates`): ``template`` with ``{prompt}`` replaced by the source prompt,
   each ``{a|b|c}`` group replaced by one of its alternatives and each
   ``__name__`` by one line of the job's wildcard file ``name``; every choice is
   uniform and drawn from ``numpy.random.default_rng(seed)`` in the order the
   groups appear, so the same (template, seed) gives the same text on every
   machine. Groups nest (``{a {big|small}|b}``).
2. **Language model** (``model``, default ``prompt_expander``): the Triton
   model writes an image description of the templated text with the job's
   ``instruction``, ``max_new_tokens`` and ``temperature`` and the unit's seed
   (:data:`genimg.contract.EXPANDER`). ``model=None`` stops after step 1.

The text the image model sees is the item's ``revised_prompt``; the index
and manifest keep ``source_prompt`` beside it, and the expander's name and
version hash (``expander``, ``expander_version``). Validation happens at
submit (:class:`ExpandSpec`, :func:`parse_template`): a template with
unbalanced braces, an empty group or a wildcard without a file is refused
with the field named, before anything is stored.

Wildcard files are read by the producer (one option per line; blank lines and
lines starting with ``#`` are skipped), stored once as
``{job_prefix}/inputs/wildcards.json`` and pinned in the spec by sha256, so
workers read exactly what was validated.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np

if TYPE_CHECKING:
    from concurrent.futures import Future

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from genimg.errors import ValidationError
from genimg.templates import (  # noqa: F401  (re-exported: the job option's template API)
    MAX_WILDCARD_BYTES,
    MAX_WILDCARD_OPTIONS,
    PROMPT_SLOT,
    Template,
    parse_template,
    read_wildcard_file,
    wildcards_json,
    wildcards_sha256,
)

DEFAULT_EXPANDER = "prompt_expander"
"""The Triton model that writes descriptions (:data:`genimg.contract.EXPANDER`)."""
DEFAULT_INSTRUCTION = "Describe a picture of {text} in one short sentence."
"""The user message sent to the language model; ``{text}`` is the templated source text."""
DEFAULT_MAX_NEW_TOKENS = 48
MAX_NEW_TOKENS = 256
"""Most tokens per description (the served model's limit, ``EXPANDER_MAX_NEW_TOKENS``)."""
MAX_TEMPERATURE = 2.0
MAX_TEMPLATE_CHARS = 2_000
MAX_INSTRUCTION_CHARS = 1_000
MAX_WILDCARDS = 64
"""Most distinct wildcard files one job may use."""
WILDCARDS_OBJECT = "inputs/wildcards.json"
"""Key of the stored wildcard options under the job's prefix: ``{name: [option, ...]}``."""
EXPANSION_COLUMNS = {"source_prompt": "str", "revised_prompt": "str", "expander": "str",
                     "expander_version": "str", "expand_tokens": "int"}
"""Index, manifest and per-item JSON columns of a job with ``expand``: the job's prompt, the prompt the
image model saw, the expander (``template`` without a language model) and its version hash, and the
tokens the language model wrote (0 for templates)."""
TEMPLATE_EXPANDER = "template"
"""The ``expander`` of a job that expands templates without a language model."""


# --------------------------------------------------------------------------- the job option


_Tokens = Annotated[StrictInt, Field(ge=1, le=MAX_NEW_TOKENS)]


class ExpandSpec(BaseModel):
    """A job's ``expand`` option, validated at submit and stored in ``job.json``.

    Attributes:
        template: the prompt template (module docstring); default ``{prompt}``.
        model: the Triton model that writes descriptions, or ``None`` for templates only.
        instruction: the language model's user message; must contain ``{text}``.
        max_new_tokens: 1..256 tokens per description.
        temperature: 0 (greedy) .. 2; finite.
        per: ``prompt`` (every image of a prompt shows one expansion, seeded by the prompt's first
            item) or ``item`` (each image its own, seeded by the item).
        wildcards_dir: the producer's directory of ``NAME.txt`` wildcard files (read at submit,
            not stored).
        wildcards: ``{name: sha256 of its options}``, filled in at submit from ``wildcards_dir``.
        wildcards_sha256: sha256 of the stored ``inputs/wildcards.json`` (None without wildcards).

    Raises:
        pydantic.ValidationError: an invalid value (``JobSpec`` reports it as ``expand.FIELD``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    template: str = Field(default="{prompt}", min_length=1, max_length=MAX_TEMPLATE_CHARS)
    model: str | None = Field(default=DEFAULT_EXPANDER, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
    instruction: str = Field(default=DEFAULT_INSTRUCTION, min_length=1, max_length=MAX_INSTRUCTION_CHARS)
    max_new_tokens: _Tokens = DEFAULT_MAX_NEW_TOKENS
    temperature: StrictFloat | StrictInt = 0.7
    per: Literal["prompt", "item"] = "prompt"
    wildcards_dir: str | None = Field(default=None, exclude=True)
    wildcards: dict[str, str] = Field(default_factory=dict)
    wildcards_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value: float) -> float:
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        if not math.isfinite(value):
            raise ValueError(f"must be finite (got {value!r})")
        if not 0 <= value <= MAX_TEMPERATURE:
            raise ValueError(f"must be in [0, {MAX_TEMPERATURE}] (got {value!r})")
        return float(value)

    @field_validator("template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        parse_template(value)
        return value

    @field_validator("instruction")
    @classmethod
    def _check_instruction(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain {text} where the source text goes")
        return value

    @model_validator(mode="after")
    def _check_wildcards(self) -> ExpandSpec:
        used = set(parse_template(self.template).wildcards)
        if self.wildcards or used:
            missing = sorted(used - set(self.wildcards))
            if missing:
                raise ExpandFieldError("template", f"uses wildcard {missing[0]!r} (__{missing[0]}__) but no "
                                                    f"wildcard file {missing[0]}.txt was given (wildcards_dir)")
            if self.wildcards_sha256 is None:
                raise ExpandFieldError("wildcards_sha256", "is required with wildcards")
        return self

    @property
    def parsed(self) -> Template:
        """The parsed :attr:`template`."""
        return parse_template(self.template)

    @property
    def uses_model(self) -> bool:
        """Whether a language model writes the descriptions."""
        return self.model is not None


class ExpandFieldError(ValueError):
    """A cross-field check of :class:`ExpandSpec` failing, naming its field (reported as ``expand.FIELD``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def load_wildcards(template: str, directory: str | Path | None) -> dict[str, list[str]]:
    """Read every wildcard file ``template`` uses from ``directory`` (``NAME.txt``).

    Raises:
        ValidationError: ``expand.template`` for a malformed template or a wildcard without a
            directory; ``expand.wildcards_dir`` for a directory that is not one (even when the template
            uses no wildcard), or a missing or bad file.
    """
    try:
        names = parse_template(template).wildcards
    except ValueError as e:
        raise ValidationError(str(e), field="expand.template") from None
    if directory is not None and not Path(directory).is_dir():
        raise ValidationError(f"{str(directory)!r} is not a directory", field="expand.wildcards_dir")
    if not names:
        return {}
    if len(names) > MAX_WILDCARDS:
        raise ValidationError(f"uses {len(names)} wildcards; the limit is {MAX_WILDCARDS}", field="expand.template")
    if directory is None:
        raise ValidationError(f"uses wildcard __{names[0]}__ but no wildcards_dir was given (the directory "
                              f"holding {names[0]}.txt)", field="expand.template")
    root = Path(directory)
    return {n: read_wildcard_file(root / f"{n}.txt") for n in names}


def prepare(expand: Mapping | ExpandSpec | None) -> tuple[dict | None, dict[str, list[str]]]:
    """The producer's first step: the ``expand`` fields to validate and the wildcard options to store.

    Reads the wildcard files the template uses from ``wildcards_dir`` and pins them by sha256.

    Returns:
        ``(fields for ExpandSpec, {name: options})``; ``(None, {})`` without ``expand``.

    Raises:
        ValidationError: ``expand`` is not a mapping, or a wildcard file is missing or bad.
    """
    if expand is None:
        return None, {}
    if isinstance(expand, ExpandSpec):
        expand = expand.model_dump() | {"wildcards_dir": expand.wildcards_dir}
    if not isinstance(expand, Mapping):
        raise ValidationError(f"must be a mapping of expansion options (got {type(expand).__name__})",
                              field="expand")
    fields = dict(expand)
    template = fields.get("template", "{prompt}")
    if not isinstance(template, str):
        raise ValidationError(f"must be a str (got {type(template).__name__})", field="expand.template")
    options = load_wildcards(template, fields.get("wildcards_dir"))
    if options:
        fields["wildcards"] = {n: hashlib.sha256(json.dumps(o, ensure_ascii=False).encode()).hexdigest()
                               for n, o in options.items()}
        fields["wildcards_sha256"] = wildcards_sha256(options)
    return fields, options


# --------------------------------------------------------------------------- per shard


def unit_of(item_index: int, images_per_prompt: int, per: str) -> int:
    """The expansion unit of an item: its first item index (``per="prompt"``) or itself (``per="item"``)."""
    return item_index if per == "item" else (item_index // images_per_prompt) * images_per_prompt


def check_revised(text: str, limit_chars: int) -> str | None:
    """Why an expansion cannot be used as a prompt (``None`` when it can): empty, or over ``limit_chars``."""
    if not text.strip():
        return "the expansion is empty"
    if len(text) > limit_chars:
        return f"the expansion is {len(text):,} characters; the prompt limit is {limit_chars:,}"
    return None


EXPAND_BATCH = 16
"""Expansions per request to the language model (one ONNX Runtime batch inside the model)."""
RETRY_SEED_SALT = 0x9E3779B97F4A7C15
"""An expansion that comes back empty or too long is asked for once more with ``seed ^ RETRY_SEED_SALT``."""


@dataclass(frozen=True)
class Expansion:
    """One unit's expansion: the revised prompt, or the reason it failed; tokens the LM wrote."""

    templated: str
    revised: str | None
    reason: str | None = None
    tokens: int = 0


class ShardExpander:
    """The expansions of one shard's units, computed in order by one background thread.

    Every distinct unit of the shard (:func:`unit_of`) is templated at once
    (cheap) and, with a language model, sent in requests of :data:`EXPAND_BATCH`
    units, in unit order, by a single thread started here. The image requests
    ask for their units with :meth:`get`, which waits only for the requests
    that hold them: the first image sub-batch is generated while later units
    are still being expanded. Everything depends on (template, source prompt,
    unit seed, options, served model) only, so a retried shard gets the same texts.

    Args:
        spec: the job (``spec.expand`` set).
        item_indices: the shard's items, int64 [N].
        source_prompts: each item's source prompt.
        infer: ``(model, inputs, outputs) -> outputs``.
        wildcards: the job's wildcard options (``inputs/wildcards.json``).
        on_expanded: called with ``(tokens, seconds)`` per expansion (metrics).
    """

    def __init__(self, spec, item_indices, source_prompts: Sequence[str | None], infer,
                 wildcards: Mapping[str, Sequence[str]], on_expanded=None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from genimg.limits import MAX_PROMPT_CHARS
        from genimg.seeds import item_seeds

        opts: ExpandSpec = spec.expand
        self.opts, self.infer, self.limit = opts, infer, MAX_PROMPT_CHARS
        self.on_expanded = on_expanded or (lambda tokens, seconds: None)
        template = opts.parsed
        self.item_units = [unit_of(int(i), spec.images_per_prompt, opts.per) for i in item_indices]
        first: dict[int, str] = {}
        for u, p in zip(self.item_units, source_prompts, strict=True):
            first.setdefault(u, p or "")
        units = list(first)
        seeds = item_seeds(spec.seed, np.array(units, dtype=np.int64)) if units else np.zeros(0, np.uint64)
        self.seeds = {u: int(s) for u, s in zip(units, seeds, strict=True)}
        self.templated = {u: template.render(first[u], self.seeds[u], wildcards) for u in units}
        self.seconds = 0.0
        self._futures: dict[int, Future[dict[int, Expansion]]] = {}
        self._pool = None
        if not opts.uses_model:
            for u in units:
                reason = check_revised(self.templated[u], self.limit)
                self._futures[u] = _done({u: Expansion(self.templated[u], None if reason else self.templated[u],
                                                       _reason_name(reason))})
            return
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expand")
        for i in range(0, len(units), EXPAND_BATCH):
            chunk = units[i:i + EXPAND_BATCH]
            fut = self._pool.submit(self._expand, chunk)
            for u in chunk:
                self._futures[u] = fut

    def _request(self, units: list[int], seeds: list[int]) -> tuple[list[str], list[int]]:
        import time

        n = len(units)
        t = time.perf_counter()
        out = self.infer(self.opts.model, {
            "TEXT": [self.templated[u] for u in units],
            "INSTRUCTION": [self.opts.instruction] * n,
            "SEED": np.array(seeds, dtype=np.uint64).reshape(n, 1),
            "MAX_NEW_TOKENS": np.full((n, 1), self.opts.max_new_tokens, dtype=np.int32),
            "TEMPERATURE": np.full((n, 1), self.opts.temperature, dtype=np.float32),
        }, ["DESCRIPTION", "TOKENS"])
        seconds = time.perf_counter() - t
        self.seconds += seconds
        texts = [bytes(b).decode("utf-8", errors="replace") for b in out["DESCRIPTION"].reshape(-1)]
        tokens = [int(x) for x in out["TOKENS"].reshape(-1)]
        for k in tokens:
            self.on_expanded(k, seconds / n)
        return texts, tokens

    def _expand(self, units: list[int]) -> dict[int, Expansion]:
        texts, tokens = self._request(units, [self.seeds[u] for u in units])
        result = {u: (t, k, check_revised(t, self.limit)) for u, t, k in zip(units, texts, tokens, strict=True)}
        again = [u for u in units if result[u][2] is not None]
        if again:  # once more with a derived seed (deterministic: a retried shard asks the same)
            texts, tokens = self._request(again, [self.seeds[u] ^ RETRY_SEED_SALT for u in again])
            for u, t, k in zip(again, texts, tokens, strict=True):
                result[u] = (t, k, check_revised(t, self.limit))
        return {u: Expansion(self.templated[u], None if why else t, _reason_name(why), k)
                for u, (t, k, why) in result.items()}

    def get(self, item_positions: Sequence[int]) -> list[Expansion]:
        """The expansions of the shard's items at ``item_positions`` (waits for their requests).

        Raises:
            whatever the language model's inference raised (RetryableError or PermanentError subclasses).
        """
        units = [self.item_units[j] for j in item_positions]
        return [self._futures[u].result()[u] for u in units]  # each future: {unit: Expansion} of its request

    def close(self) -> None:
        """Stop the expansion thread (pending requests are cancelled)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _done(value: dict[int, Expansion]) -> Future[dict[int, Expansion]]:
    """A future that already holds ``value``."""
    from concurrent.futures import Future

    f: Future[dict[int, Expansion]] = Future()
    f.set_result(value)
    return f


def _reason_name(why: str | None) -> str | None:
    if why is None:
        return None
    return "expansion_empty" if "empty" in why else "expansion_too_long"
