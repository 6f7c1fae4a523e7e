"""Profile-driven tensors: a request's inputs from items, and images and metadata from its outputs.

Everything a worker sends or reads is derived from the job's resolved
:class:`~genimg.profiles.schema.ModelProfile`; nothing here knows a model.

Noise (case C11): an item's noise is drawn from ``PCG64(SeedSequence(item_seed))``,
one generator per item, every noise input in declaration order from the same
stream: ``normal`` is ``standard_normal(n, float32)``, ``uniform`` is
``2 * random(n, float32) - 1``; then multiplied by ``scale`` (when not 1) and
reshaped. The first noise input of a profile with ``scale = 1`` is therefore
bit-identical to :func:`genimg.seeds.noise_from_seed`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from genimg import imaging
from genimg.errors import ModelError
from genimg.profiles.params import item_params
from genimg.profiles.schema import ModelProfile

NP_DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
"""Triton dtype name → numpy dtype."""

_INT63 = np.uint64(2**63 - 1)


class ProfileMismatchError(ModelError):
    """The served model's tensors differ from what its profile declares (reason ``profile_mismatch``)."""

    reason = "profile_mismatch"


def _noise(profile: ModelProfile, seeds: np.ndarray) -> dict[str, np.ndarray]:
    specs = [(n, b) for n, b in profile.inputs.items() if b.kind == "noise"]
    if not specs:
        return {}
    out = {n: np.empty((len(seeds), *b.shape), dtype=NP_DTYPES[b.dtype]) for n, b in specs}
    for k, seed in enumerate(seeds.tolist()):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed))))
        for name, b in specs:
            n = math.prod(b.shape)
            if b.distribution == "normal":
                x = rng.standard_normal(n, dtype=np.float32)
            else:
                x = rng.random(n, dtype=np.float32) * np.float32(2) - np.float32(1)
            if b.scale != 1:
                x = x * np.float32(b.scale)
            out[name][k] = x.reshape(b.shape)
    return out


def build_inputs(profile: ModelProfile, *, seeds: np.ndarray, prompts: Sequence[str | None],
                 item_values: Sequence[Mapping[str, Any]], negative_prompt: str | None,
                 per_prompt: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The request tensors for a batch of items.

    Args:
        profile: the job's profile.
        seeds: uint64 ``[B]`` item seeds.
        prompts: ``B`` prompts (``None`` for noise profiles).
        item_values: ``B`` mappings of parameter values (:func:`genimg.profiles.params.item_params`).
        negative_prompt: the job's negative prompt (``""`` is sent when ``None``).
        per_prompt: the prompt stage's outputs, one row per item (:func:`gather_stage`).

    Returns:
        ``{tensor: array [B, *shape] of the declared dtype, or a list of B str}``.
    """
    b = len(seeds)
    noise = _noise(profile, seeds)
    out: dict[str, Any] = {}
    for name, bind in profile.inputs.items():
        dtype = NP_DTYPES[bind.dtype]
        if bind.kind == "prompt":
            out[name] = [p or "" for p in prompts]
        elif bind.kind == "negative_prompt":
            out[name] = [negative_prompt or ""] * b
        elif bind.kind == "seed":
            s = seeds.astype(np.uint64)
            s = s if bind.dtype == "UINT64" else (s & _INT63).astype(np.int64)
            out[name] = np.ascontiguousarray(np.broadcast_to(s.reshape(b, *([1] * len(bind.shape))),
                                                             (b, *bind.shape)))
        elif bind.kind == "noise":
            out[name] = noise[name]
        elif bind.kind == "param":
            p = bind.param or name
            vals = np.array([float(v[p]) for v in item_values], dtype=np.float64) * bind.scale + bind.offset
            out[name] = np.ascontiguousarray(np.broadcast_to(vals.reshape(b, *([1] * len(bind.shape))),
                                                             (b, *bind.shape)).astype(dtype))
        elif bind.kind == "per_prompt":
            assert per_prompt is not None and bind.stage_output is not None
            out[name] = np.ascontiguousarray(per_prompt[bind.stage_output], dtype=dtype)
        else:  # constant
            out[name] = np.full((b, *bind.shape), bind.value, dtype=dtype)
    return out


def item_values(params: Mapping[str, Any], indices: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
    """:func:`~genimg.profiles.params.item_params` for each item index."""
    return [item_params(params, int(i)) for i in indices]


def read_images(profile: ModelProfile, out: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[B, H, W, C]`` images and a bool ``[B]`` finiteness mask from one answer.

    Float images are mapped from the profile's range with the saturating
    conversion (:func:`genimg.imaging.to_uint8`); non-finite items are zeroed
    and flagged. A uint8 image's finiteness comes from the profile's
    ``finite`` output when it has one.

    Raises:
        ProfileMismatchError: the image tensor's shape or channel count is not the declared one.
    """
    spec = profile.image
    img = np.asarray(out[spec.tensor])
    if img.ndim != 4:
        raise ProfileMismatchError(f"{profile.triton_model}: output {spec.tensor} has shape {list(img.shape)}; "
                                   f"the profile declares [B, {', '.join(map(str, spec.dims))}]")
    b = len(img)
    if img.dtype == np.uint8:
        finite = np.ones(b, bool)
        images = imaging.to_uint8(img, layout=spec.layout)
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            finite = np.isfinite(img.reshape(b, -1)).all(axis=1)
            safe = np.where(np.isfinite(img), img, 0).astype(img.dtype, copy=False)
        low, high = spec.range
        images = imaging.to_uint8(safe, float(low), float(high), layout=spec.layout)
    if profile.finite and profile.finite in out:
        finite &= np.asarray(out[profile.finite]).reshape(b, -1).all(axis=1).astype(bool)
    if images.shape[-1] != spec.channels:
        raise ProfileMismatchError(f"{profile.triton_model}: output {spec.tensor} has {images.shape[-1]} "
                                   f"channels; the profile declares {spec.channels}")
    return images, finite


def read_metadata(profile: ModelProfile, out: Mapping[str, np.ndarray], row: int) -> dict[str, Any]:
    """The metadata columns of item ``row``: the first element of each declared output, as its column type.

    A non-finite float becomes ``None`` (a null in the index; JSON has no NaN).
    """
    values: dict[str, Any] = {}
    for column, m in profile.metadata.items():
        x = np.asarray(out[m.tensor])[row].reshape(-1)[0]
        if m.type == "int":
            values[column] = int(x)
        elif m.type == "float":
            f = float(x)
            values[column] = f if math.isfinite(f) else None  # JSON has no NaN; the column is null
        elif m.type == "bool":
            values[column] = bool(x)
        else:
            values[column] = x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
    return values


def stage_outputs(profile: ModelProfile) -> list[str]:
    """The prompt stage's output tensors the profile's ``per_prompt`` inputs read, in order."""
    return list(dict.fromkeys(b.stage_output for b in profile.inputs.values() if b.stage_output))


def check_stage(profile: ModelProfile, inputs: Mapping[str, tuple[str, tuple[int, ...]]],
                outputs: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Compare the served prompt-stage model with the profile (its one BYTES input, the outputs read).

    Raises:
        ProfileMismatchError: naming the tensor that is missing or differs.
    """
    stage = profile.prompt_stage
    assert stage is not None
    if dict(inputs) != {stage.prompt_input: ("BYTES", (1,))}:
        raise ProfileMismatchError(f"{stage.model}: inputs are {dict(inputs)}; the profile's prompt_stage needs "
                                   f"exactly {stage.prompt_input} BYTES [1]")
    for name, bind in profile.inputs.items():
        if bind.stage_output is None:
            continue
        served = outputs.get(bind.stage_output)
        if served is None or served[0] != bind.dtype or tuple(served[1]) != tuple(bind.shape):
            raise ProfileMismatchError(f"{stage.model}: output {bind.stage_output} is served as {served}; input "
                                       f"{name} needs {bind.dtype} {list(bind.shape)}")


def output_bindings(profile: ModelProfile) -> list[tuple[str, str, tuple[int, ...]]]:
    """The served outputs a profile reads: ``(tensor, Triton dtype, dims without the batch axis)`` of its image,
    its metadata columns, then its finiteness flag (``BOOL [1]``) if it has one."""
    out: list[tuple[str, str, tuple[int, ...]]] = [(profile.image.tensor, profile.image.dtype,
                                                    tuple(profile.image.dims))]
    out += [(m.tensor, m.dtype, tuple(m.shape)) for m in profile.metadata.values()]
    if profile.finite:
        out.append((profile.finite, "BOOL", (1,)))
    return out


def check_served(profile: ModelProfile, inputs: Mapping[str, tuple[str, tuple[int, ...]]],
                 outputs: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Compare the served model's declared tensors with the profile (before its first request).

    Args:
        profile: the job's profile.
        inputs: served ``{name: (dtype, dims without batch)}``.
        outputs: same, for outputs.

    Raises:
        ProfileMismatchError: naming the first tensor that is missing or differs in dtype or shape.
    """
    model = profile.triton_model

    def fits(served: tuple[int, ...], declared: tuple[int, ...]) -> bool:
        return len(served) == len(declared) and all(s == -1 or d == -1 or s == d
                                                    for s, d in zip(served, declared, strict=True))

    missing = set(inputs) - set(profile.inputs)
    if missing:
        raise ProfileMismatchError(f"{model}: input {sorted(missing)[0]} is served but the profile does not bind it")
    for name, bind in profile.inputs.items():
        if name not in inputs:
            raise ProfileMismatchError(f"{model}: input {name} is in the profile but not served "
                                       f"(served: {sorted(inputs)})")
        dtype, dims = inputs[name]
        if dtype != bind.dtype or not fits(dims, bind.shape):
            raise ProfileMismatchError(f"{model}: input {name} is served as {dtype} {list(dims)}; "
                                       f"the profile declares {bind.dtype} {list(bind.shape)}")
    for name, want_dtype, want_dims in output_bindings(profile):
        if name not in outputs:
            raise ProfileMismatchError(f"{model}: output {name} is in the profile but not served "
                                       f"(served: {sorted(outputs)})")
        dtype, dims = outputs[name]
        if dtype != want_dtype or not fits(dims, tuple(want_dims)):
            raise ProfileMismatchError(f"{model}: output {name} is served as {dtype} {list(dims)}; "
                                       f"the profile declares {want_dtype} {list(want_dims)}")
