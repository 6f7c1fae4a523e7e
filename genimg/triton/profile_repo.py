"""The profile-driven part of the model repository: ONNX models and ensembles that profiles declare.

A profile's optional ``[serve]`` section tells genimg's builder how to serve it
(see ``docs/model-contract.md``):

- ``serve.models``: single ONNX models, each served by the generic Python-backend
  model (``onnx_model.py``, cpu flavour) or as a ``tensorrt_plan`` (tensorrt flavour).
  Tensor names, dtypes and dims are read from the ONNX file itself with ONNX
  Runtime; a rank-1 tensor (``[batch]``) is declared ``[1]`` and reshaped by the
  Python backend (cpu) or by Triton (tensorrt: ``reshape { shape: [] }``).
- ``serve.ensemble``: steps of an ensemble named ``triton_model``, whose own
  inputs and outputs are the profile's bindings.

Every config carries the ``genimg_sha256`` parameter: the sha256 of the model
file (ONNX or plan), or for an ensemble the sha256 of its steps' hashes, so a
worker can record a content hash as each item's ``model_version``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from genimg.errors import ModelError
from genimg.models.fetch import resolve_onnx, sha256_file
from genimg.profiles.registry import Profiles
from genimg.profiles.schema import ModelProfile
from genimg.profiles.tensors import output_bindings

log = logging.getLogger(__name__)

VERSION_PARAMETER = "genimg_sha256"
"""Config parameter with the served files' sha256 (read by :class:`genimg.triton.client.InferenceClient`)."""

ORT_DTYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
              "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
              "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16",
              "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(bool)": "BOOL",
              "tensor(string)": "BYTES"}
"""ONNX Runtime type strings → Triton dtype names."""


@dataclass(frozen=True)
class OnnxTensor:
    """One tensor of an ONNX graph as Triton declares it: dims without the batch axis (``-1`` = any)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    flat: bool = False
    """The ONNX tensor is rank 1 (``[batch]``): declared ``[1]``."""


def onnx_signature(path: Path) -> tuple[list[OnnxTensor], list[OnnxTensor]]:
    """The inputs and outputs of an ONNX file whose first axis is the batch.

    Raises:
        ModelError: the file is missing, not ONNX, has a tensor of a type Triton lacks, or a
            tensor without a leading (batch) axis.
    """
    if not path.is_file():
        raise ModelError(f"no ONNX file at {path}")
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise ModelError(f"{path} is not a loadable ONNX model: {e}") from e

    def one(t) -> OnnxTensor:
        if t.type not in ORT_DTYPES:
            raise ModelError(f"{path}: tensor {t.name} has type {t.type}, which Triton does not serve")
        if not t.shape:
            raise ModelError(f"{path}: tensor {t.name} is a scalar; genimg models take a batch axis first")
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in t.shape[1:])
        return OnnxTensor(t.name, ORT_DTYPES[t.type], dims or (1,), flat=not dims)

    return [one(t) for t in sess.get_inputs()], [one(t) for t in sess.get_outputs()]


def _set_version(cfg, sha: str) -> None:
    cfg.parameters[VERSION_PARAMETER].string_value = sha


def onnx_model_config(pb, name: str, sig: tuple[list[OnnxTensor], list[OnnxTensor]], flavor: str, *,
                      instances: int, max_batch_size: int, intra_op_threads: int, queue_delay_us: int,
                      preferred: list[int], dtypes: dict[str, str]):
    """The ``ModelConfig`` of a profile's single ONNX model (see the module docstring)."""
    inputs, outputs = sig
    cfg = pb.ModelConfig(name=name, max_batch_size=max_batch_size)
    for group, tensors in ((cfg.input, inputs), (cfg.output, outputs)):
        for t in tensors:
            entry = group.add(name=t.name, data_type=getattr(pb, dtypes[t.dtype]), dims=list(t.dims))
            if t.flat and flavor != "cpu":  # a TensorRT engine sees [B]: Triton reshapes [B, 1] to it
                entry.reshape.SetInParent()
    kind = pb.ModelInstanceGroup.KIND_CPU if flavor == "cpu" else pb.ModelInstanceGroup.KIND_GPU
    cfg.instance_group.add(count=instances, kind=kind)
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    if flavor == "cpu":
        cfg.backend = "python"
        for k, v in {"onnx_file": "model.onnx", "intra_op_threads": str(intra_op_threads),
                     "providers": "CPUExecutionProvider"}.items():
            cfg.parameters[k].string_value = v
    else:
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
    if all(-1 not in t.dims for t in inputs) and all(t.dtype != "BYTES" for t in inputs):
        w = cfg.model_warmup.add(name=f"{name}_batch1", batch_size=1, count=1)
        for t in inputs:
            w.inputs[t.name].data_type = getattr(pb, dtypes[t.dtype])
            w.inputs[t.name].dims.extend(t.dims)
            w.inputs[t.name].zero_data = True
    return cfg


def _binding_dims(profile: ModelProfile) -> tuple[list[tuple[str, str, tuple[int, ...]]],
                                                  list[tuple[str, str, tuple[int, ...]]]]:
    inputs: list[tuple[str, str, tuple[int, ...]]] = [(n, b.dtype, tuple(b.shape)) for n, b in profile.inputs.items()]
    return inputs, output_bindings(profile)


def ensemble_config(pb, profile: ModelProfile, max_batch_size: int, dtypes: dict[str, str]):
    """The ``ModelConfig`` of a profile's ensemble: its bindings as tensors, ``serve.ensemble`` as steps."""
    assert profile.serve is not None
    cfg = pb.ModelConfig(name=profile.triton_model, platform="ensemble", max_batch_size=max_batch_size)
    inputs, outputs = _binding_dims(profile)
    for name, dtype, dims in inputs:
        cfg.input.add(name=name, data_type=getattr(pb, dtypes[dtype]), dims=list(dims))
    for name, dtype, dims in outputs:
        cfg.output.add(name=name, data_type=getattr(pb, dtypes[dtype]), dims=list(dims))
    for s in profile.serve.ensemble:
        step = cfg.ensemble_scheduling.step.add(model_name=s.model, model_version=-1)
        step.input_map.update(s.inputs)
        step.output_map.update(s.outputs)
    return cfg


def build_profile_models(out: Path, profiles: Profiles, flavor: str, shas: dict[str, str], *, pb, write_config,
                         copy_model, dtypes: dict[str, str], preferred: list[int], plan_dir: Path | None,
                         instances: int, max_batch_size: int, intra_op_threads: int, queue_delay_us: int
                         ) -> tuple[list[str], list[str]]:
    """Write every profile's ``serve.models`` and ensemble into the repository ``out``.

    Args:
        out: the repository directory (genimg's own models are already in it).
        profiles: the profiles to serve; those without ``[serve]`` are skipped.
        flavor: ``cpu`` or ``tensorrt``.
        shas: model name → sha256 of what is served; updated in place.
        pb, write_config, copy_model: the config proto module and writers of :mod:`genimg.triton.repo`.
        dtypes: Triton dtype name → ``model_config_pb2`` type name.
        preferred: dynamic batcher preferred batch sizes.
        plan_dir: tensorrt: directory of ``{model}.plan``.
        instances, max_batch_size, intra_op_threads, queue_delay_us: as for genimg's own models.

    Returns:
        the single models and the ensembles written.

    Raises:
        ModelError: an ONNX file is missing or unusable, a fetch failed, an ensemble step names a
            model the repository lacks, or two profiles serve one model name from different files.
    """
    models, ensembles = [], []
    for profile in profiles.profiles.values():
        if profile.serve is None:
            continue
        profile_dir = profiles.directory
        for m in profile.serve.models:
            onnx = resolve_onnx(m, profile_dir)
            sha = sha256_file(onnx)
            if m.name in shas:
                if shas[m.name] != sha:
                    raise ModelError(f"model {m.name} is served from two different files")
                continue
            cfg = onnx_model_config(pb, m.name, onnx_signature(onnx), flavor, instances=max(instances, m.instances),
                                    max_batch_size=max_batch_size, intra_op_threads=intra_op_threads,
                                    queue_delay_us=queue_delay_us, preferred=preferred, dtypes=dtypes)
            mdir = out / m.name
            if flavor == "cpu":
                copy_model(mdir, "onnx_model.py", onnx)
            else:
                (mdir / "1").mkdir(parents=True, exist_ok=True)
                plan = plan_dir / f"{m.name}.plan" if plan_dir else None
                if plan is not None and plan.is_file():
                    shutil.copyfile(plan, mdir / "1" / "model.plan")
                    sha = sha256_file(plan)
            _set_version(cfg, sha)
            write_config(cfg, mdir)
            shas[m.name] = sha
            models.append(m.name)
    for profile in profiles.profiles.values():
        if profile.serve is None or not profile.serve.ensemble or profile.triton_model in shas:
            continue
        missing = [s.model for s in profile.serve.ensemble if not (out / s.model / "config.pbtxt").is_file()]
        if missing:
            raise ModelError(f"profile {profile.name}: ensemble steps name models the repository lacks: {missing}")
        cfg = ensemble_config(pb, profile, max_batch_size, dtypes)
        parts = {s.model: shas.get(s.model, "") for s in profile.serve.ensemble}
        sha = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        _set_version(cfg, sha)
        write_config(cfg, out / profile.triton_model)
        (out / profile.triton_model / "1").mkdir(exist_ok=True)
        shas[profile.triton_model] = sha
        ensembles.append(profile.triton_model)
    log.info("profiles %s: served %d models, %d ensembles", os.fspath(profiles.directory), len(models),
             len(ensembles))
    return models, ensembles
