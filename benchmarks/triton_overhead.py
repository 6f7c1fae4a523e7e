"""Images/s of ``txt2img`` through the local Triton (cpu flavour) versus the same ONNX models in-process.

One run measures both sides at each batch size, alternating Triton and
in-process rounds so that background load affects both alike, and prints one
JSON object::

    {"batches": {"1": {"triton_images_per_s": …, "inprocess_images_per_s": …, "ratio": …}, …}, "setup": {…}}

``ratio`` = Triton / in-process (1.0 = no overhead). Both sides run the same
ONNX files with the same ONNX Runtime intra-op thread count and embed every
item's prompt (Triton: ``text_encoder``, then ``txt2img`` with the embeddings as
``COND``; in-process: :meth:`OnnxReference.txt2img`); requests are sent
one after another by one client (no pipelining across requests), so the ratio
is the per-request cost of Triton: serialisation, gRPC/HTTP, the Python-backend
stubs' shared memory, and the ensemble's hops between four model processes.

Usage::

    python benchmarks/triton_overhead.py                       # committed weights (or random ones if absent)
    python benchmarks/triton_overhead.py --onnx-dir .cache/genimg/onnx --protocol http --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a handwritten 7", "the digit three", "number nine, written by hand", "a zero", "eight, neatly drawn"]


def _onnx_dir(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    from genimg.settings import WEIGHTS_DIR

    if all((WEIGHTS_DIR / f"{n}.safetensors").is_file() for n in ("generator", "upscaler", "verifier")):
        from genimg.triton.repo import ensure_onnx

        return ensure_onnx(), "committed weights"
    import torch
    from safetensors.torch import save_file

    from genimg.models.export import export_all
    from genimg.models.nets import Generator, Upscaler, Verifier

    torch.manual_seed(0)
    (tmp / "w").mkdir()
    for name, cls in (("generator", Generator), ("upscaler", Upscaler), ("verifier", Verifier)):
        save_file(cls().state_dict(), str(tmp / "w" / f"{name}.safetensors"))
    export_all(tmp / "onnx", weights_dir=tmp / "w")
    return tmp / "onnx", "random weights (no trained weights found)"


def _rate(fn, batch: int, seconds: float) -> float:
    """Images/s of ``fn()`` (one batch per call), timed over at least ``seconds`` and 3 calls."""
    fn()  # warm this shape
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx-dir", help="ONNX files (default: export the committed weights through the cache)")
    ap.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per batch size (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, both sides")
    ap.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    args = ap.parse_args(argv)

    from genimg.triton.client import InferenceClient
    from genimg.triton.reference import OnnxReference
    from genimg.triton.repo import build_repository
    from genimg.triton.server import TritonServer

    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="genimg-bench-") as tmp_s:
        tmp = Path(tmp_s)
        onnx_dir, weights = _onnx_dir(args.onnx_dir, tmp)
        repo = build_repository(tmp / "repo", "cpu", onnx_dir, intra_op_threads=args.threads)
        ref = OnnxReference(onnx_dir, intra_op_threads=args.threads)
        results: dict[str, dict[str, float]] = {}
        with TritonServer(repo) as server, InferenceClient(server.urls[args.protocol], args.protocol) as client:
            for batch in batches:
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
                z = rng.standard_normal((batch, 100))
                tri, inp = [], []
                for _ in range(args.rounds):
                    tri.append(_rate(lambda p=prompts, z=z: client.infer(
                        "txt2img", {"COND": client.infer("text_encoder", {"PROMPT": p})["EMBEDDING"], "Z": z}),
                        batch, args.seconds))
                    inp.append(_rate(lambda p=prompts, z=z: ref.txt2img(p, z), batch, args.seconds))
                t, i = statistics.median(tri), statistics.median(inp)
                results[str(batch)] = {"triton_images_per_s": round(t, 1), "inprocess_images_per_s": round(i, 1),
                                       "ratio": round(t / i, 3)}
    report = {"batches": results, "setup": {
        "model": "txt2img", "protocol": args.protocol, "intra_op_threads": args.threads, "weights": weights,
        "rounds": args.rounds, "min_seconds": args.seconds, "cpus": os.cpu_count(), "python": platform.python_version(),
        "loadavg_1min": round(os.getloadavg()[0], 2)}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
