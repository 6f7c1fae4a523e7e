"""TensorRT FP16 engines with dynamic-batch optimisation profiles, for the GPU model repository.

Built from the same ONNX files as the cpu flavour with TensorRT's Python API
(``tensorrt.Builder`` / ``OnnxParser``; https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html).
Every input gets one optimisation profile with batch min 1, opt 64, max 256
(:data:`BATCH_MIN`, :data:`BATCH_OPT`, :data:`BATCH_MAX`). Per-item shapes
(without the batch axis) come from :data:`ENGINE_MODELS`:

- genimg's digit models: fixed shapes; the upscaler is pinned to the 28 x 28 x 1
  generator output the digit ensembles send.
- the profile-served fetched models (:mod:`genimg.models.sources`): ``faces``
  (Z [100]) and ``terrain`` (noisy [1, 128, 128], sigma and difficulty [B])
  are fixed; ``esrgan_slim_x4`` and ``vintage`` take any H x W, so their
  profiles give a range: ESRGAN H, W min 16 / opt 64 / max 128 (``faces_x4``
  sends 64 x 64 faces and gets 256 x 256; up to 128 → 512 fits), vintage H, W
  min 64 / opt 256 / max 256 (``faces_x4_vintage`` sends the 256 x 256 ESRGAN
  output; larger sizes at batch 256 would need several GiB per activation).
- any other model a profile serves (``serve.models``) whose per-item input
  shapes are all fixed gets the batch profile from its ONNX signature; one with
  a variable axis and no entry here is skipped with the reason.

The profile logic is plain Python and unit-tested without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BATCH_MIN, BATCH_OPT, BATCH_MAX = 1, 64, 256
"""Batch sizes of every optimisation profile."""

ItemShapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""(min, opt, max) shape of one item, without the batch axis."""


def _fixed(*shape: int) -> ItemShapes:
    return (tuple(shape), tuple(shape), tuple(shape))


ENGINE_MODELS: dict[str, dict[str, ItemShapes]] = {
    "generator": {"Z": _fixed(100), "COND": _fixed(384)},
    "generator_uncond": {"Z": _fixed(100)},
    "upscaler": {"IMAGE": _fixed(28, 28, 1)},
    "verifier": {"IMAGE": _fixed(28, 28, 1)},
    "faces": {"Z": _fixed(100)},
    "esrgan_slim_x4": {"IMAGE": ((16, 16, 3), (64, 64, 3), (128, 128, 3))},
    "vintage": {"IMAGE": ((64, 64, 3), (256, 256, 3), (256, 256, 3))},
    "terrain": {"noisy": _fixed(1, 128, 128), "sigma": _fixed(), "difficulty": _fixed()},
}
"""Per model: each input's per-item (min, opt, max) shape. ``sigma`` and ``difficulty`` are rank-1 ([B])."""

DIGIT_MODELS = ("generator", "generator_uncond", "upscaler", "verifier")
"""Engines built from genimg's own ONNX export (``--onnx-dir``); the others come from the profiles."""


@dataclass(frozen=True)
class Profile:
    """One input's optimisation profile: (min, opt, max) full shapes, batch axis first."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profiles_for(model: str, batch: tuple[int, int, int] = (BATCH_MIN, BATCH_OPT, BATCH_MAX),
                 inputs: dict[str, ItemShapes] | None = None) -> list[Profile]:
    """The optimisation profile of every input of ``model``.

    Args:
        model: a key of :data:`ENGINE_MODELS` (or any name when ``inputs`` is given).
        batch: (min, opt, max) batch sizes.
        inputs: per-item shapes to use instead of :data:`ENGINE_MODELS`'s entry.

    Raises:
        KeyError: ``model`` has no engine entry (e.g. the Python-backend text encoder).
        ValueError: the batch sizes or an input's shapes are not ordered min <= opt <= max.
    """
    lo, opt, hi = batch
    if not lo <= opt <= hi:
        raise ValueError(f"profile batch sizes must satisfy min <= opt <= max, got {batch}")
    out = []
    for name, (smin, sopt, smax) in (inputs if inputs is not None else ENGINE_MODELS[model]).items():
        if not (len(smin) == len(sopt) == len(smax)
                and all(a <= b <= c for a, b, c in zip(smin, sopt, smax, strict=True))):
            raise ValueError(f"{model}.{name}: shapes must satisfy min <= opt <= max, got {smin}, {sopt}, {smax}")
        out.append(Profile(name, (lo, *smin), (opt, *sopt), (hi, *smax)))
    return out


def onnx_item_shapes(onnx_path: Path) -> dict[str, ItemShapes] | str:
    """Per-item shapes of an ONNX file's inputs when they are all fixed; else why not (a str)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shapes: dict[str, ItemShapes] = {}
    for i in sess.get_inputs():
        dims = i.shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            return f"input {i.name} has a variable axis ({i.shape}): add its min/opt/max to ENGINE_MODELS"
        shapes[i.name] = _fixed(*dims)
    return shapes


def engine_sources(onnx_dir: Path | None, profiles=None) -> dict[str, Path]:
    """Every model a TensorRT repository serves as a plan, and its ONNX file.

    Args:
        onnx_dir: genimg's digit ONNX export (``generator.onnx``, ...); ``None`` skips the digit models.
        profiles: :class:`genimg.profiles.registry.Profiles` whose ``serve.models`` to add
            (fetched through :mod:`genimg.models.fetch` when ``fetch:NAME``); default the profiles directory.

    Raises:
        ModelError / ModelFetchError: a profile's ONNX file is missing or cannot be fetched.
    """
    from genimg.models.fetch import resolve_onnx
    from genimg.profiles import load_profiles

    out: dict[str, Path] = {}
    if onnx_dir is not None:
        out.update({m: Path(onnx_dir) / f"{m}.onnx" for m in DIGIT_MODELS})
    registry = profiles if profiles is not None else load_profiles()
    for profile in registry.profiles.values():
        for m in (profile.serve.models if profile.serve else ()):
            if m.name not in out:
                out[m.name] = resolve_onnx(m, registry.directory)
    return out


def tensorrt_unavailable_reason() -> str | None:
    """Why engines cannot be built here (``None`` when TensorRT and a CUDA GPU are present)."""
    try:
        import tensorrt  # noqa: F401 - imported only to learn whether it is installed
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
                 workspace_bytes: int = 4 << 30, inputs: dict[str, ItemShapes] | None = None) -> Path:
    """Parse ``onnx_path`` and serialise an engine with :func:`profiles_for` to ``plan_path``.

    Args:
        inputs: per-item shapes (default :data:`ENGINE_MODELS`'s entry for ``model``).

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
    for p in profiles_for(model, inputs=inputs):
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {model}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    return plan_path


def build_engines(onnx_dir: Path | None, out_dir: Path, profiles=None,
                  models: list[str] | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """Build ``out_dir/{model}.plan`` for every model of :func:`engine_sources` (or only ``models``).

    Returns:
        ``(built, skipped)``: model → plan path, and model → why no plan was built
        (a variable input axis without an entry in :data:`ENGINE_MODELS`).
    """
    built: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for model, onnx in engine_sources(onnx_dir, profiles).items():
        if models is not None and model not in models:
            continue
        shapes = ENGINE_MODELS.get(model) or onnx_item_shapes(onnx)
        if isinstance(shapes, str):
            skipped[model] = shapes
            log.warning("no TensorRT plan for %s: %s", model, shapes)
            continue
        built[model] = build_engine(onnx, out_dir / f"{model}.plan", model, inputs=shapes)
    return built, skipped
