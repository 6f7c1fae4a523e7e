"""The job specification: :class:`JobSpec`, what a producer validates before anything is stored or enqueued,
and what a worker trusts after re-validating the stored ``job.json``.

:class:`JobSpec` is one dataset job (frozen pydantic model, JSON round trip with
a schema version). Every user-given value is bounded (the bounds and the prompt
rules are :mod:`genimg.limits`, the output URL rules :mod:`genimg.urls`); an
invalid value raises :class:`genimg.errors.ValidationError` whose ``field`` names
the first failing field and whose message says what is wrong. Its shards are a
:class:`genimg.shardplan.ShardPlan`; its items' seeds are :mod:`genimg.seeds`.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictStr, ValidationInfo

from genimg.errors import ValidationError
from genimg.expand import ExpandFieldError, ExpandSpec
from genimg.keepif import KEEP_IF_COLUMNS, MAX_REGENERATE, MAX_SHARD_TRIES, KeepIf, check_column, parse_keep_if
from genimg.layout import JOB_ID_PATTERN
from genimg.limits import (
    DEFAULT_PROMPT_CHUNK_SIZE,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_IMAGES_PER_PROMPT,
    MAX_MANIFEST_PART_SHARDS,
    MAX_MANIFEST_PARTS,
    MAX_NAME_CHARS,
    MAX_OUTPUT_URL_CHARS,
    MAX_PROMPT_CHUNK_SIZE,
    MAX_SEED,
    MAX_SHARD_SIZE,
    MAX_SHARDS,
    MAX_SPEC_JSON_BYTES,
    MAX_SUB_BATCH_SIZE,
    MAX_TOTAL_ITEMS,
    prompt_problem,
    short,
)
from genimg.profiles.params import resolve_params
from genimg.profiles.registry import Profiles, load_profiles
from genimg.profiles.schema import NAME_PATTERN, ModelProfile
from genimg.settings import SpecSettings
from genimg.shardplan import ShardPlan, manifest_part_shards_for, plan_shards
from genimg.urls import validate_output_url

# --------------------------------------------------------------------------- limits

SCHEMA_VERSION: Final = 2
"""Version of the stored ``job.json`` layout; :meth:`JobSpec.from_json` reads only this one.
Version 2 stores the resolved model profile and the generation parameters."""

IMAGE_FORMATS: Final = ("png", "webp", "jpeg")

OMITTED_WHEN_UNSET: Final = ("keep_if", "dedup")
"""JobSpec fields :meth:`JobSpec.to_json` leaves out while ``None`` (added within schema version 2)."""

PRIORITY_NAMES: Final = {"low": 0, "normal": 5, "high": 9}
"""Named priorities. Priorities are ints 0..9 where a HIGHER number runs sooner;
the queue layer maps this onto its transport (kombu's Redis transport treats 0
as the most urgent, so it must send ``9 - priority``)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII, no spaces



# --------------------------------------------------------------------------- job spec


def derive_job_id(idempotency_key: str | None = None) -> str:
    """Return a job id: 32 lowercase hex digits.

    With an idempotency key the id is ``sha256("genimg-job-id/v1\\0" + key)``
    truncated to 128 bits, so submitting the same key again names the same job;
    without one it is a random ``uuid4().hex``.

    Raises:
        ValidationError: ``field="idempotency_key"`` if the key breaks its rules.
    """
    if idempotency_key is None:
        return uuid.uuid4().hex
    _check_idempotency_key(idempotency_key)
    digest = hashlib.sha256(b"genimg-job-id/v1\0" + idempotency_key.encode("ascii")).hexdigest()
    return digest[:32]


def _check_idempotency_key(key: object) -> None:
    if not isinstance(key, str) or not (1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS) \
            or not _IDEMPOTENCY_KEY_RE.match(key):
        raise ValidationError(f"must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters "
                              f"(no spaces) (got {short(key)})", field="idempotency_key")


class _FieldError(ValueError):
    """A cross-field check's failure, carrying the field it blames."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _integral(value: object) -> object:
    """Accept Python and numpy integers; refuse booleans (``True`` is not a count)."""
    if isinstance(value, bool):
        raise ValueError(f"must be an integer, not a boolean (got {value!r})")
    if isinstance(value, numbers.Integral):
        return int(value)
    return value


def _priority(value: object) -> object:
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in PRIORITY_NAMES:
            raise ValueError(f"must be an integer 0-9 or one of {', '.join(PRIORITY_NAMES)} "
                             f"(got {short(value)})")
        return PRIORITY_NAMES[key]
    return _integral(value)


_Int = Annotated[int, Strict(), BeforeValidator(_integral)]
_Priority = Annotated[int, Strict(), BeforeValidator(_priority)]


class JobSpec(BaseModel):
    """One dataset job, as validated at submit time and stored once as ``job.json``.

    Build one with :meth:`create` (derives ``job_id`` and ``created_at``) and
    store it with :meth:`to_json`; a worker reads it back with :meth:`from_json`,
    which re-validates everything. Both raise :class:`genimg.errors.ValidationError`
    with ``field`` set to the first failing field. (Plain ``JobSpec(**fields)``
    or ``model_validate`` validate the same rules but raise pydantic's own
    ``ValidationError``; a custom ``__init__`` would make pydantic drop the
    validation context, so there is none.)

    Prompts are not part of the spec: the producer streams them into chunks of
    ``prompt_chunk_size`` under :attr:`prompts_url` (see
    :mod:`genimg.inputs`) and records only ``num_prompts``.

    Attributes:
        schema_version: layout version of the stored JSON (``SCHEMA_VERSION``).
        job_id: 32 hex digits, see :func:`derive_job_id`; must match the
            idempotency key when one is given.
        model: the name of a model profile (:mod:`genimg.profiles`), e.g. ``"txt2img"``.
        profile: the resolved profile, stored with the job so that workers run exactly what
            was validated (resolved from ``model`` and ``upscale`` at submit; never given).
        params: the profile's generation parameters, validated, defaults filled in; a list
            is a sweep (item ``i`` takes ``values[i % len(values)]``).
        negative_prompt: text for the profile's negative-prompt input (only profiles with one).
        count: noise profiles only: number of images, 1..``MAX_TOTAL_ITEMS``.
        num_prompts: text profiles only: number of prompts stored, >= 1.
        prompts_sha256: text profiles only: sha256 of the prompts as stored, in order
            (:func:`genimg.inputs.prompts_digest`); set by the producer once every prompt is stored, so
            that reusing an idempotency key with other prompts is a conflict, not the old job.
        prompt_chunk_size: text profiles only: prompts per stored chunk, 1..10,000.
        images_per_prompt: 1..64 for text profiles; must be 1 for noise profiles.
        seed: job seed, 0..2**63-1; item seeds derive from it (:func:`genimg.seeds.item_seed`).
        keep_if: the quality filter (:mod:`genimg.keepif`), ``"<column> <op> <number>"`` on one of the
            profile's int or float metadata columns, e.g. ``"score >= 0.9"``; stored in canonical form.
            ``None``: every image is kept.
        regenerate: with ``keep_if``, extra seeds an item may try until its image passes, 0..64
            (:func:`genimg.seeds.attempt_seed`); an item that never passes is failed ``keep_if_unmet``.
        output: normalised output URL (:func:`genimg.urls.validate_output_url`); the job's
            files live under ``{output}/{job_id}/``.
        image_format: ``png``, ``webp`` or ``jpeg``.
        quality: 1..100, for lossy webp and jpeg (png ignores it).
        shard_size: items per shard, 1..10,000; at most ``MAX_SHARDS`` shards.
        manifest_part_shards: shards per manifest part, 1..1,000 (:mod:`genimg.manifest`);
            derived at submit from ``shard_size`` (:func:`genimg.shardplan.manifest_part_shards_for`), stored so
            that every worker and finaliser cuts the same parts; at most ``MAX_MANIFEST_PARTS`` parts.
        sub_batch_size: items per Triton request, 1..256.
        upscale: run the named profile (true) or its ``without_upscale`` variant (false).
        priority: 0..9, higher runs sooner; accepts ``low``/``normal``/``high``
            (0/5/9) on input and is stored as the integer.
        name: optional label, 1-64 of ``A-Za-z0-9._-``, starting alphanumeric.
        idempotency_key: optional, 1-256 visible ASCII characters.
        created_at: timezone-aware submit time, stored in UTC.
        expand: prompt expansion (:class:`genimg.expand.ExpandSpec`: template, language model,
            max_new_tokens, temperature), text profiles only; ``None``: prompts go to the model as given.
        dedup: mark duplicates in the manifest's ``duplicate_of`` column at finalisation: ``"exact"``
            (same image sha256) or ``"near"`` (pHash within :data:`genimg.dedup.NEAR_DISTANCE` bits, exact
            ones included); ``None`` (default): only reported (``dedup.json``). Nothing is ever deleted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    schema_version: Literal[2] = SCHEMA_VERSION
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    model: str = Field(pattern=NAME_PATTERN)
    profile: ModelProfile
    params: dict[str, Any] = Field(default_factory=dict)
    negative_prompt: str | None = None
    count: _Int | None = Field(default=None, ge=1, le=MAX_TOTAL_ITEMS)
    num_prompts: _Int | None = Field(default=None, ge=1, le=MAX_TOTAL_ITEMS)
    prompts_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    prompt_chunk_size: _Int | None = Field(default=None, ge=1, le=MAX_PROMPT_CHUNK_SIZE)
    images_per_prompt: _Int = Field(default=1, ge=1, le=MAX_IMAGES_PER_PROMPT)
    seed: _Int = Field(default=0, ge=0, le=MAX_SEED)
    keep_if: StrictStr | None = None
    regenerate: _Int = Field(default=0, ge=0, le=MAX_REGENERATE)
    output: str = Field(max_length=MAX_OUTPUT_URL_CHARS)
    image_format: Literal["png", "webp", "jpeg"] = "png"
    quality: _Int = Field(default=95, ge=1, le=100)
    shard_size: _Int = Field(default=1_000, ge=1, le=MAX_SHARD_SIZE)
    manifest_part_shards: _Int | None = Field(default=None, ge=1, le=MAX_MANIFEST_PART_SHARDS)
    sub_batch_size: _Int = Field(default=64, ge=1, le=MAX_SUB_BATCH_SIZE)
    upscale: Annotated[bool, Strict()] = True
    priority: _Priority = Field(default=PRIORITY_NAMES["normal"], ge=0, le=9)
    name: str | None = None
    idempotency_key: str | None = Field(default=None, min_length=1,
                                        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
                                        pattern=_IDEMPOTENCY_KEY_RE.pattern)
    created_at: datetime
    expand: ExpandSpec | None = None
    dedup: Literal["exact", "near"] | None = None

    # ---- construction

    @classmethod
    def create(cls, *, settings: SpecSettings | None = None, profiles: Profiles | None = None,
               **fields: Any) -> JobSpec:
        """Validate a new job's fields; derive ``job_id``, ``created_at`` and ``profile``.

        Args:
            settings: where ``file://`` outputs may go; read from the
                environment (``GENIMG_LOCAL_OUTPUT_ROOT``) when omitted.
            profiles: the profiles ``model`` names one of; default the profiles
                directory (``GENIMG_PROFILES_DIR``, else the bundled profiles).
            **fields: the attributes listed on the class (not ``profile``).

        Raises:
            ValidationError: naming the first invalid field (``params.NAME`` for a parameter).
        """
        if "profile" in fields:
            raise ValidationError("is resolved from model (and upscale); do not give it", field="profile")
        if fields.get("model") is None:
            raise ValidationError("is required: the name of a model profile", field="model")
        upscale = fields.get("upscale", True)
        if not isinstance(upscale, bool):
            raise ValidationError(f"must be a bool (got {short(upscale)})", field="upscale")
        registry = profiles if profiles is not None else load_profiles()
        fields = {**fields, "profile": registry.resolve(fields["model"], upscale=upscale)}
        return cls._validate(fields, settings=settings, derive=True)

    @classmethod
    def from_json(cls, data: str | bytes, *, settings: SpecSettings | None = None) -> JobSpec:
        """Read a stored ``job.json`` and validate it as strictly as at submit time.

        ``job_id`` and ``created_at`` must be present (nothing is derived), and a
        spec edited in storage into anything invalid is refused.

        Raises:
            ValidationError: naming the first invalid field (``"spec"`` when the
                document itself is not a JSON object or is too large).
        """
        if len(data) > MAX_SPEC_JSON_BYTES:
            raise ValidationError(f"stored spec is {len(data):,} bytes; the limit is "
                                  f"{MAX_SPEC_JSON_BYTES:,}", field="spec")
        return cls._validate(data, settings=settings, derive=False)

    @classmethod
    def _validate(cls, data: Any, *, settings: SpecSettings | None, derive: bool) -> JobSpec:
        root = (settings or SpecSettings.from_env()).local_output_root
        context = {"local_output_root": root, "derive": derive}
        try:
            if isinstance(data, (str, bytes)):
                return cls.model_validate_json(data, context=context)
            return cls.model_validate(data, context=context)
        except pydantic.ValidationError as e:
            raise _from_pydantic(e) from e

    def to_json(self) -> str:
        """The spec as compact JSON (fields in declaration order), as stored in ``job.json``.

        Optional fields added after a job layout was in use (:data:`OMITTED_WHEN_UNSET`, and
        ``regenerate`` while it is 0 without ``keep_if``) are left out while unset, so a job that does not
        use them stores the same bytes as before they existed.
        """
        unset = {name for name in OMITTED_WHEN_UNSET if getattr(self, name) is None}
        if self.keep_if is None and self.regenerate == 0:
            unset.add("regenerate")
        return self.model_dump_json(exclude=unset or None)

    # ---- validators

    @pydantic.model_validator(mode="before")
    @classmethod
    def _fill_derived(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        context = info.context or {}
        data = dict(data)
        if context.get("derive", True):
            if data.get("job_id") is None:
                key = data.get("idempotency_key")
                try:
                    data["job_id"] = derive_job_id(key)
                except ValidationError as e:
                    raise _FieldError(e.field, str(e).removeprefix(f"{e.field}: ")) from None
            if data.get("created_at") is None:
                data["created_at"] = datetime.now(UTC)
            regenerate = data.get("regenerate", 0)
            if data.get("keep_if") is not None and "shard_size" not in data and type(regenerate) is int \
                    and 0 <= regenerate <= MAX_REGENERATE:  # every shard's worst case within MAX_SHARD_TRIES
                data["shard_size"] = min(1_000, MAX_SHARD_TRIES // (1 + regenerate))
            size = data.get("shard_size", 1_000)
            if data.get("manifest_part_shards") is None and type(size) is int and size >= 1:
                data["manifest_part_shards"] = manifest_part_shards_for(size)
            profile = data.get("profile")
            if isinstance(profile, ModelProfile) and profile.task == "text" \
                    and data.get("prompt_chunk_size") is None:
                data["prompt_chunk_size"] = DEFAULT_PROMPT_CHUNK_SIZE
        return data

    @pydantic.field_validator("negative_prompt")
    @classmethod
    def _check_negative_prompt(cls, value: str | None) -> str | None:
        if value is not None:
            problem = prompt_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @pydantic.field_validator("keep_if")
    @classmethod
    def _check_keep_if(cls, value: str | None) -> str | None:
        return None if value is None else str(parse_keep_if(value))

    @pydantic.field_validator("output")
    @classmethod
    def _check_output(cls, value: str, info: ValidationInfo) -> str:
        context = info.context
        if context is not None and "local_output_root" in context:
            root = context["local_output_root"]
        else:
            root = SpecSettings.from_env().local_output_root
        try:
            return validate_output_url(value, local_output_root=root)
        except ValidationError as e:
            raise _FieldError("output", str(e).removeprefix("output: ")) from None

    @pydantic.field_validator("schema_version", mode="before")
    @classmethod
    def _check_schema_version(cls, value: object) -> object:
        if value != SCHEMA_VERSION or isinstance(value, bool):
            raise ValueError(f"unsupported schema version {short(value)}; this genimg reads "
                             f"version {SCHEMA_VERSION}")
        return value

    @pydantic.field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > MAX_NAME_CHARS or not _NAME_RE.match(value)):
            raise ValueError(f"must be 1-{MAX_NAME_CHARS} of A-Z a-z 0-9 . _ - starting with a "
                             f"letter or digit (got {short(value)})")
        return value

    @pydantic.field_validator("created_at")
    @classmethod
    def _check_created_at(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("must be timezone-aware (e.g. datetime.now(timezone.utc))")
        return value.astimezone(UTC)

    @pydantic.model_validator(mode="after")
    def _check_consistency(self) -> JobSpec:
        task, model = self.profile.task, repr(self.model)
        if self.upscale and self.profile.name != self.model:
            raise _FieldError("model", f"names profile {model} but the stored profile is {self.profile.name!r}")
        if task == "text":
            if self.count is not None:
                raise _FieldError("count", f"is for noise profiles; {model} is a text profile: give prompts "
                                           "(num_prompts)")
            if self.num_prompts is None:
                raise _FieldError("num_prompts", f"is required for the text profile {model}")
            if self.prompt_chunk_size is None:
                raise _FieldError("prompt_chunk_size", f"is required for the text profile {model}")
        else:
            if self.num_prompts is not None:
                raise _FieldError("num_prompts", f"is for text profiles; {model} is a noise profile: give count")
            if self.prompt_chunk_size is not None:
                raise _FieldError("prompt_chunk_size", "is for text profiles only")
            if self.count is None:
                raise _FieldError("count", f"is required for the noise profile {model}")
            if self.images_per_prompt != 1:
                raise _FieldError("images_per_prompt", f"must be 1 for the noise profile {model} "
                                                       "(use count for more images)")
        try:
            resolved = resolve_params(self.profile, self.params)
        except ValidationError as e:
            raise _FieldError(e.field, str(e).removeprefix(f"{e.field}: ")) from None
        if resolved != self.params:
            object.__setattr__(self, "params", resolved)  # defaults filled in, floats as floats
        if self.expand is not None:
            if task != "text":
                raise _FieldError("expand", f"is for text profiles; {model} is a noise profile")
            problem = prompt_problem(self.expand.template.replace("{prompt}", ""))
            if problem is not None:
                raise _FieldError("expand.template", problem)
        if self.keep_if is not None:
            try:
                check_column(parse_keep_if(self.keep_if), {c: m.type for c, m in self.profile.metadata.items()},
                             self.profile.name)
            except ValueError as e:
                raise _FieldError("keep_if", str(e)) from None
            tries = self.shard_size * (1 + self.regenerate)
            if tries > MAX_SHARD_TRIES:
                raise _FieldError("shard_size", f"{self.shard_size:,} items x (1 + regenerate {self.regenerate}) = "
                                                f"{tries:,} images a shard may have to make; the limit is "
                                                f"{MAX_SHARD_TRIES:,} (so that a shard finishes within the task "
                                                f"time limit): use shard_size <= "
                                                f"{MAX_SHARD_TRIES // (1 + self.regenerate):,} or leave it out")
        elif self.regenerate:
            raise _FieldError("regenerate", f"is {self.regenerate} but there is no keep_if to regenerate for; "
                                            "give keep_if (e.g. 'score >= 0.9') or leave regenerate at 0")
        if self.negative_prompt is not None and not any(
                b.kind == "negative_prompt" for b in self.profile.inputs.values()):
            raise _FieldError("negative_prompt", f"profile {self.profile.name!r} takes no negative prompt")
        total = self.total_items
        if total > MAX_TOTAL_ITEMS:
            raise _FieldError("num_prompts", f"num_prompts x images_per_prompt = {total:,} exceeds "
                                             f"the limit of {MAX_TOTAL_ITEMS:,} items per job")
        shards = math.ceil(total / self.shard_size)
        if shards > MAX_SHARDS:
            raise _FieldError("shard_size", f"{total:,} items in shards of {self.shard_size:,} make "
                                            f"{shards:,} shards; the limit is {MAX_SHARDS:,}, so "
                                            "raise shard_size")
        parts = -(-shards // (self.manifest_part_shards or manifest_part_shards_for(self.shard_size)))
        if parts > MAX_MANIFEST_PARTS:
            raise _FieldError("manifest_part_shards", f"{shards:,} shards make {parts:,} manifest parts; "
                                                      f"the limit is {MAX_MANIFEST_PARTS:,}")
        if self.idempotency_key is not None and self.job_id != derive_job_id(self.idempotency_key):
            raise _FieldError("job_id", "does not match the idempotency key it must derive from")
        size = len(self.model_dump_json())
        if size > MAX_SPEC_JSON_BYTES:
            raise _FieldError("params", f"the job's stored spec would be {size:,} bytes; the limit is "
                                        f"{MAX_SPEC_JSON_BYTES:,} (shorten the parameter sweeps)")
        return self

    # ---- derived values

    @property
    def total_items(self) -> int:
        """Number of images the job makes (``count``, or ``num_prompts * images_per_prompt``)."""
        if self.profile.task == "noise":
            return self.count or 0
        return (self.num_prompts or 0) * self.images_per_prompt

    @property
    def keep_rule(self) -> KeepIf | None:
        """The parsed ``keep_if`` (:class:`genimg.keepif.KeepIf`), or ``None`` without a filter."""
        return None if self.keep_if is None else parse_keep_if(self.keep_if)

    @property
    def job_prefix(self) -> str:
        """URL under which this job's files live: ``{output}/{job_id}``."""
        return f"{self.output}/{self.job_id}"

    @property
    def prompts_url(self) -> str:
        """URL under which the prompt chunks live (``{job_prefix}/prompts``)."""
        return f"{self.job_prefix}/prompts"

    @property
    def metadata_columns(self) -> dict[str, str]:
        """The job's per-item columns after the index's own: the profile's metadata, the expansion's, the filter's.

        Column name → declared type (``int``, ``float``, ``bool``, ``str``), in order
        (:func:`genimg.index.index_schema`; :data:`genimg.expand.EXPANSION_COLUMNS`;
        :data:`genimg.keepif.KEEP_IF_COLUMNS` with ``keep_if``).
        """
        from genimg.expand import EXPANSION_COLUMNS

        columns: dict[str, str] = {c: m.type for c, m in self.profile.metadata.items()}
        if self.expand is not None:
            columns.update(EXPANSION_COLUMNS)
        if self.keep_if is not None:
            columns.update(KEEP_IF_COLUMNS)
        return columns

    def shard_plan(self) -> ShardPlan:
        """The job's shards (see :func:`genimg.shardplan.plan_shards`)."""
        return plan_shards(self.total_items, self.shard_size)



def _from_pydantic(error: pydantic.ValidationError) -> ValidationError:
    """One genimg ValidationError naming the first failing field of a pydantic error."""
    errors = error.errors(include_url=False)
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        field, message = cause.field, cause.message
    elif isinstance(cause, ExpandFieldError):
        field, message = f"expand.{cause.field}", cause.message
    else:
        loc = first.get("loc") or ()
        field = str(loc[0]) if loc else "spec"
        if field == "expand" and len(loc) > 1 and isinstance(loc[1], str):
            field = f"expand.{loc[1]}"
        kind = first.get("type", "")
        if kind == "missing":
            message = "is required"
        elif kind == "extra_forbidden":
            message = f"is not a JobSpec field (got {short(first.get('input'))})"
        elif isinstance(cause, Exception):
            message = str(cause)
        else:
            message = str(first.get("msg", "is invalid"))
            message = message[:1].lower() + message[1:]
            if loc:
                message += f" (got {short(first.get('input'))})"
    if len(errors) > 1:
        message += f" [{len(errors) - 1} more error{'s' if len(errors) > 2 else ''}]"
    return ValidationError(message, field=field)
