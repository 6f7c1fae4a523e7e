"""GPU check: generator + upscaler images/s at batch 64 and 256, fp32 and fp16; TensorRT engines if possible.

Run on a machine with an NVIDIA GPU and PyTorch::

    python benchmarks/gpu_check.py [--seconds 5]

Prints exactly one JSON line. Without CUDA it prints ``{"skipped": reason}``
and exits 0. Figures are images/s of the serving path (uint8 in, uint8 out:
``GeneratorForExport`` then ``UpscalerForExport``), after warm-up, timed with
CUDA events over at least ``--seconds`` per configuration; the fp32 figure at
each batch is the baseline of its fp16 ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _measure(gen, up, batch: int, dtype, seconds: float) -> float:
    import torch

    from genimg.models.nets import COND_DIM, Z_DIM

    z = torch.randn(batch, Z_DIM, device="cuda", dtype=dtype)
    c = torch.nn.functional.normalize(torch.randn(batch, COND_DIM, device="cuda", dtype=dtype), dim=1)
    with torch.inference_mode():
        for _ in range(5):
            up(gen(z, c)[0])
        torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            up(gen(z, c)[0])
            n += 1
        torch.cuda.synchronize()
        return n * batch / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print(json.dumps({"skipped": "PyTorch is not installed"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA GPU is visible"}))
        return 0
    import copy

    from genimg.models.export import export_all, load_trained
    from genimg.models.nets import GeneratorForExport, UpscalerForExport
    from genimg.models import engines

    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "images_per_s": {}}
    gen32 = GeneratorForExport(load_trained("generator")).cuda().eval()
    up32 = UpscalerForExport(load_trained("upscaler")).cuda().eval()
    for batch in (64, 256):
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            gen = copy.deepcopy(gen32).to(dtype) if dtype != torch.float32 else gen32
            up = copy.deepcopy(up32).to(dtype) if dtype != torch.float32 else up32
            result["images_per_s"][f"batch{batch}_{name}"] = round(_measure(gen, up, batch, dtype, args.seconds), 1)
        r = result["images_per_s"]
        result.setdefault("fp16_over_fp32", {})[f"batch{batch}"] = round(
            r[f"batch{batch}_fp16"] / r[f"batch{batch}_fp32"], 3)
    reason = engines.tensorrt_unavailable_reason()
    if reason:
        result["tensorrt"] = {"skipped": reason}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_dir = Path(tmp) / "onnx"
            export_all(onnx_dir, with_text_encoder=False)
            t = time.perf_counter()
            plans = engines.build_engines(onnx_dir, Path(tmp) / "plans")
            result["tensorrt"] = {"built": sorted(plans), "seconds": round(time.perf_counter() - t, 1),
                                  "bytes": {k: p.stat().st_size for k, p in plans.items()}}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
