"""GPU check of the tensorrt flavour: images/s of every served model on ONNX Runtime CUDA and TensorRT.

Run on a machine with an NVIDIA GPU (PyTorch with CUDA; ``onnxruntime-gpu`` for
the ONNX Runtime figures, ``tensorrt`` for the engines)::

    python benchmarks/gpu_check.py [--seconds 3] [--models faces,esrgan_slim_x4] [--out DIR]
    python benchmarks/gpu_check.py --plan      # what it would measure; needs no GPU

Prints exactly one JSON line. Without CUDA it prints ``{"skipped": reason,
"plan": ...}`` and exits 0 (the suite runs this path). Measured, each over at
least ``--seconds`` after warm-up:

* ``digits``: genimg's generator + upscaler in PyTorch (``GeneratorForExport``,
  ``UpscalerForExport``), batch 64 and 256, fp32 and fp16.
* ``models``: each profile-served model (``faces`` Z → 64 x 64, ``esrgan_slim_x4``
  64 x 64 → 256 x 256, ``vintage`` 256 x 256, ``terrain`` 128 x 128) at batch 64 and
  256, **model only** (inputs and outputs resident on the GPU: ONNX Runtime IO
  binding, TensorRT device buffers): ``ort_cuda`` runs the cached ONNX file
  (fp32) with the CUDA execution provider, ``tensorrt`` an FP16 engine built
  here with :mod:`genimg.models.engines`' optimisation profile (build seconds
  and plan bytes reported).
* ``pipelines``: ``faces_x4`` (faces → ESRGAN) and ``faces_x4_vintage`` (→ vintage)
  **through the pipeline's batching**: host noise in, host images out, the steps
  chained on the GPU as a Triton ensemble chains them, in requests of 64 (a
  worker's sub-batch) and 256 (what the dynamic batcher forms from four of them).

Every shape measured lies inside the engines' profiles (``plan`` lists them);
a configuration that fails (e.g. out of GPU memory) records its error instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCHES = (64, 256)
MODELS = ("faces", "esrgan_slim_x4", "vintage", "terrain")
PIPELINES = {"faces_x4": ("faces", "esrgan_slim_x4"), "faces_x4_vintage": ("faces", "esrgan_slim_x4", "vintage")}
ITEM_INPUTS: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {
    "faces": {"Z": ((100,), "float32")},
    "esrgan_slim_x4": {"IMAGE": ((64, 64, 3), "uint8")},
    "vintage": {"IMAGE": ((256, 256, 3), "uint8")},
    "terrain": {"noisy": ((1, 128, 128), "float32"), "sigma": ((), "float32"), "difficulty": ((), "float32")},
}
"""Per model: each input's per-item shape and dtype as the pipelines send it."""
STEP_IO = {"faces": ("Z", "IMAGE"), "esrgan_slim_x4": ("IMAGE", "UPSCALED"), "vintage": ("IMAGE", "STYLED")}
"""Pipeline steps: (input, output) tensor chained to the next step."""


def plan() -> dict:
    """What a GPU run measures, with the engine profile each shape must fit (no GPU needed)."""
    from genimg.models.engines import profiles_for

    out: dict = {"batches": list(BATCHES), "models": {}, "pipelines": {k: list(v) for k, v in PIPELINES.items()}}
    for m in MODELS:
        prof = {p.name: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)} for p in profiles_for(m)}
        out["models"][m] = {"inputs": {n: {"item_shape": list(s), "dtype": d} for n, (s, d) in ITEM_INPUTS[m].items()},
                            "engine_profile": prof}
    return out


def make_inputs(model: str, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Host inputs of ``model`` for one request of ``batch`` items (as the pipelines send them)."""
    feed = {}
    for name, (shape, dtype) in ITEM_INPUTS[model].items():
        if dtype == "uint8":
            feed[name] = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
        elif model == "terrain" and name == "sigma":
            feed[name] = np.full((batch, *shape), 80.0, np.float32)
        elif model == "terrain" and name == "difficulty":
            feed[name] = np.full((batch, *shape), 0.5, np.float32)
        else:
            feed[name] = rng.standard_normal((batch, *shape), dtype=np.float32) * (80.0 if model == "terrain" else 1)
    return feed


def _rate(fn, batch: int, seconds: float, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    sync()
    return round(n * batch / (time.perf_counter() - start), 1)


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing configuration (OOM, unsupported op) is recorded
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


# ------------------------------------------------------------------------------ ONNX Runtime CUDA
class OrtCuda:
    """An ONNX Runtime CUDA session; ``bind`` runs with inputs and outputs on the GPU."""

    def __init__(self, onnx: Path) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.sess = ort.InferenceSession(str(onnx), providers=["CUDAExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def on_device(self, feed: dict[str, np.ndarray]) -> dict:
        return {k: self.ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feed.items()}

    def run_device(self, feed: dict) -> dict:
        io = self.sess.io_binding()
        for k, v in feed.items():
            io.bind_ortvalue_input(k, v)
        for o in self.outputs:
            io.bind_output(o, "cuda")
        self.sess.run_with_iobinding(io)
        return dict(zip(self.outputs, io.get_outputs()))


def ort_reason() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu)"
    return None


# ------------------------------------------------------------------------------ TensorRT
class TrtEngine:
    """A deserialised TensorRT engine run on torch CUDA buffers (``execute_async_v3``)."""

    def __init__(self, plan: Path, stream) -> None:
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.stream = stream
        """A ``torch.cuda.Stream`` shared by every engine: callers copy and chain on it (``torch.cuda.stream``)."""

    def _dtype(self, name: str):
        import torch

        return {self.trt.DataType.FLOAT: torch.float32, self.trt.DataType.HALF: torch.float16,
                self.trt.DataType.UINT8: torch.uint8, self.trt.DataType.BOOL: torch.bool,
                self.trt.DataType.INT32: torch.int32, self.trt.DataType.INT64: torch.int64}[
            self.engine.get_tensor_dtype(name)]

    def run_device(self, feed: dict) -> dict:
        """``feed``: torch CUDA tensors by input name; returns the output tensors."""
        out = {}
        for n in self.inputs:
            self.context.set_input_shape(n, tuple(feed[n].shape))
            self.context.set_tensor_address(n, feed[n].data_ptr())
        for n in self.names:
            if n not in self.inputs:
                out[n] = self.torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtype(n),
                                          device="cuda")
                self.context.set_tensor_address(n, out[n].data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        return out

    def sync(self) -> None:
        self.stream.synchronize()


# ------------------------------------------------------------------------------ measurements
def measure_digits(seconds: float) -> dict:
    """genimg's generator + upscaler in PyTorch, fp32 and fp16 (the figures this script had first)."""
    import copy

    import torch

    from genimg.models.export import load_trained
    from genimg.models.nets import COND_DIM, Z_DIM, GeneratorForExport, UpscalerForExport

    res: dict = {"images_per_s": {}, "fp16_over_fp32": {}}
    gen32 = GeneratorForExport(load_trained("generator")).cuda().eval()
    up32 = UpscalerForExport(load_trained("upscaler")).cuda().eval()
    for batch in BATCHES:
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            gen = copy.deepcopy(gen32).to(dtype) if dtype != torch.float32 else gen32
            up = copy.deepcopy(up32).to(dtype) if dtype != torch.float32 else up32
            z = torch.randn(batch, Z_DIM, device="cuda", dtype=dtype)
            c = torch.nn.functional.normalize(torch.randn(batch, COND_DIM, device="cuda", dtype=dtype), dim=1)
            with torch.inference_mode():
                res["images_per_s"][f"batch{batch}_{name}"] = _rate(lambda g=gen, u=up, z=z, c=c: u(g(z, c)[0]),
                                                                    batch, seconds, torch.cuda.synchronize)
        r = res["images_per_s"]
        res["fp16_over_fp32"][f"batch{batch}"] = round(r[f"batch{batch}_fp16"] / r[f"batch{batch}_fp32"], 3)
    return res


def measure_model_ort(model: str, onnx: Path, seconds: float) -> dict:
    s = OrtCuda(onnx)
    rng = np.random.default_rng(0)
    out = {}
    for b in BATCHES:
        def one(b=b):
            dev = s.on_device(make_inputs(model, b, rng))
            return _rate(lambda: s.run_device(dev), b, seconds, lambda: None)  # run_with_iobinding syncs
        out[f"batch{b}"] = _safe(one)
    return out


def measure_model_trt(engine: TrtEngine, model: str, seconds: float) -> dict:
    import torch

    rng = np.random.default_rng(0)
    out = {}
    for b in BATCHES:
        def one(b=b):
            with torch.cuda.stream(engine.stream):
                dev = {k: torch.from_numpy(v).cuda() for k, v in make_inputs(model, b, rng).items()}
                return _rate(lambda: engine.run_device(dev), b, seconds, engine.sync)
        out[f"batch{b}"] = _safe(one)
    return out


def measure_pipeline(steps: tuple[str, ...], runners: dict, kind: str, seconds: float) -> dict:
    """Host noise in, host images out, steps chained on the GPU, requests of 64 and 256."""
    import torch

    rng = np.random.default_rng(1)
    out = {}
    for b in BATCHES:
        z = make_inputs("faces", b, rng)["Z"]

        def once(z=z):
            if kind == "ort_cuda":
                cur = runners[steps[0]].on_device({"Z": z})
                for k, step in enumerate(steps):
                    res = runners[step].run_device(cur)[STEP_IO[step][1]]
                    cur = {STEP_IO[steps[k + 1]][0]: res} if k + 1 < len(steps) else None
                return res.numpy()
            with torch.cuda.stream(runners[steps[0]].stream):  # copies and steps in order on one stream
                cur = {"Z": torch.from_numpy(z).cuda()}
                for k, step in enumerate(steps):
                    res = runners[step].run_device(cur)[STEP_IO[step][1]]
                    cur = {STEP_IO[steps[k + 1]][0]: res} if k + 1 < len(steps) else None
                return res.cpu().numpy()  # waits for the stream

        out[f"batch{b}"] = _safe(lambda b=b, f=once: _rate(f, b, seconds, lambda: None))
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    from genimg.models import engines
    from genimg.models.fetch import fetch_model

    models = [m for m in args.models.split(",") if m] if args.models else list(MODELS)
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "plan": plan()}
    result["digits"] = _safe(lambda: measure_digits(args.seconds))
    onnx = {m: fetch_model(m) for m in models}
    result["models"] = {m: {} for m in models}
    ort_why, trt_why = ort_reason(), engines.tensorrt_unavailable_reason()
    ort_runners, trt_runners = {}, {}
    if ort_why is None:
        for m in models:
            result["models"][m]["ort_cuda"] = _safe(lambda m=m: measure_model_ort(m, onnx[m], args.seconds))
            ort_runners[m] = _safe(lambda m=m: OrtCuda(onnx[m]))
    else:
        result["ort_cuda"] = {"skipped": ort_why}
    if trt_why is None:
        plan_dir = Path(args.out or tempfile.mkdtemp(prefix="genimg-plans-"))
        stream = torch.cuda.Stream()
        for m in models:
            t = time.perf_counter()
            built = _safe(lambda m=m: engines.build_engine(onnx[m], plan_dir / f"{m}.plan", m))
            if isinstance(built, dict):
                result["models"][m]["tensorrt"] = {"build": built}
                continue
            build_s = round(time.perf_counter() - t, 1)
            trt_runners[m] = _safe(lambda p=built: TrtEngine(p, stream))
            measured = (_safe(lambda m=m: measure_model_trt(trt_runners[m], m, args.seconds))
                        if isinstance(trt_runners[m], TrtEngine) else {"load": trt_runners[m]})
            result["models"][m]["tensorrt"] = {"build_s": build_s, "plan_bytes": built.stat().st_size, **measured}
    else:
        result["tensorrt"] = {"skipped": trt_why}
    result["pipelines"] = {}
    for name, steps in PIPELINES.items():
        for kind, runners in (("ort_cuda", ort_runners), ("tensorrt", trt_runners)):
            if all(isinstance(runners.get(s), (OrtCuda, TrtEngine)) for s in steps):
                result["pipelines"].setdefault(name, {})[kind] = measure_pipeline(steps, runners, kind, args.seconds)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per configuration")
    ap.add_argument("--models", default="", help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--out", default="", help="directory for the built plans (default: a temporary one)")
    ap.add_argument("--plan", action="store_true", help="print what would be measured and exit (no GPU needed)")
    args = ap.parse_args(argv)
    if args.plan:
        print(json.dumps({"plan": plan()}, sort_keys=True))
        return 0
    try:
        import torch
    except ImportError:
        print(json.dumps({"skipped": "PyTorch is not installed", "plan": plan()}, sort_keys=True))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA GPU is visible", "plan": plan()}, sort_keys=True))
        return 0
    print(json.dumps(run(args), sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
