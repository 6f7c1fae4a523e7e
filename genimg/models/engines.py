"""TensorRT FP16 engines with dynamic-batch optimisation profiles, for the GPU model repository.

Built from the same ONNX files as the cpu flavour with TensorRT's Python API
(``tensorrt.Builder`` / ``OnnxParser``; https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html).
Each batch axis gets one optimisation profile (min 1, opt 64, max 256); the
upscaler's spatial axes are pinned to the 28×28×1 generator output used by
the ensembles. The profile logic is plain Python and unit-tested without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BATCH_MIN, BATCH_OPT, BATCH_MAX = 1, 64, 256
"""Batch sizes of every optimisation profile."""

ENGINE_MODELS: dict[str, dict[str, tuple[int, ...]]] = {
    "generator": {"Z": (100,), "COND": (384,)},
    "generator_uncond": {"Z": (100,)},
    "upscaler": {"IMAGE": (28, 28, 1)},
    "verifier": {"IMAGE": (28, 28, 1)},
}
"""Per model: each input's shape without the batch axis."""


@dataclass(frozen=True)
class Profile:
    """One input's optimisation profile: (min, opt, max) full shapes, batch axis first."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profiles_for(model: str, batch: tuple[int, int, int] = (BATCH_MIN, BATCH_OPT, BATCH_MAX)) -> list[Profile]:
    """The optimisation profile of every input of ``model``.

    Raises:
        KeyError: ``model`` has no engine (e.g. the Python-backend text encoder).
    """
    lo, opt, hi = batch
    if not lo <= opt <= hi:
        raise ValueError(f"profile batch sizes must satisfy min <= opt <= max, got {batch}")
    return [Profile(n, (lo, *s), (opt, *s), (hi, *s)) for n, s in ENGINE_MODELS[model].items()]


def tensorrt_unavailable_reason() -> str | None:
    """Why engines cannot be built here (``None`` when TensorRT and a CUDA GPU are present)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT's Python package (tensorrt) is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    except ImportError:
        pass
    return None


def build_engine(onnx_path: Path, plan_path: Path, model: str, fp16: bool = True,
                 workspace_bytes: int = 2 << 30) -> Path:
    """Parse ``onnx_path`` and serialise an engine with :func:`profiles_for` to ``plan_path``.

    Raises:
        RuntimeError: the ONNX file does not parse or the build fails.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for p in profiles_for(model):
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {model}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    return plan_path


def build_engines(onnx_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Build every engine of :data:`ENGINE_MODELS` into ``out_dir/{model}.plan``."""
    return {m: build_engine(onnx_dir / f"{m}.onnx", out_dir / f"{m}.plan", m) for m in ENGINE_MODELS}
