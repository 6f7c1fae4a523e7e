"""Upper bound: the served ONNX models in this one Python process, no queue, no network.

Items ``[0, N)`` of the benchmark's txt2img job (prompt ``i // images_per_prompt``,
noise from :func:`genimg.seeds.batch_noise`, the same as genimg's) are cut into
batches of ``--batch``; ``--threads`` threads each take a batch, run the
``txt2img`` computation with :class:`genimg.triton.reference.OnnxReference`
(text encoder → generator → upscaler and verifier: what the Triton ensemble
runs, with the same ONNX files and ONNX Runtime options), encode every image as
PNG with :func:`genimg.imaging.encode` (the bytes genimg stores) and write it to
``--out-dir/NNNNNNNN.png``. ONNX Runtime and zlib release the GIL, so two
threads keep two cores busy. Sessions are created before the clock starts (as
Triton's models are loaded before a job is submitted).

Prints one JSON object: ``images_per_s``, ``seconds``, per-batch stage seconds.

    python benchmarks/upper_bound.py --onnx-dir .cache/genimg/onnx --prompts P.txt --images-per-prompt 50 \\
        --count 5000 --batch 64 --threads 2 --intra-op 1 --out-dir /tmp/ub
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx-dir", required=True)
    ap.add_argument("--prompts", required=True, help="text file, one prompt a line")
    ap.add_argument("--images-per-prompt", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--intra-op", type=int, default=1)
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)

    import numpy as np

    from genimg import imaging
    from genimg.seeds import batch_noise
    from genimg.triton.reference import OnnxReference

    prompts = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = OnnxReference(args.onnx_dir, intra_op_threads=args.intra_op)
    ref.txt2img(prompts[:2], batch_noise(0, [0, 1]))  # first-run allocations, as Triton's warmup does
    ipp = args.images_per_prompt

    def batch(start: int) -> dict[str, float]:
        idx = np.arange(start, min(start + args.batch, args.count))
        t0 = time.perf_counter()
        res = ref.txt2img([prompts[int(i) // ipp] for i in idx], batch_noise(args.seed, idx))
        t1 = time.perf_counter()
        pngs = [imaging.encode(img, "png") for img in res["IMAGE"]]
        t2 = time.perf_counter()
        for i, data in zip(idx, pngs):
            (out / f"{int(i):08d}.png").write_bytes(data)
        t3 = time.perf_counter()
        return {"infer": t1 - t0, "encode": t2 - t1, "write": t3 - t2, "bytes": sum(map(len, pngs))}

    setup_cpu_s = time.process_time()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        stages = list(pool.map(batch, range(0, args.count, args.batch)))
    seconds = time.perf_counter() - t0
    report = {"images": args.count, "seconds": round(seconds, 3), "images_per_s": round(args.count / seconds, 2),
              "bytes": int(sum(s["bytes"] for s in stages)), "setup_cpu_s": round(setup_cpu_s, 3),
              "stage_samples": {k: [round(s[k], 5) for s in stages] for k in ("infer", "encode", "write")},
              "stage_unit": f"batch of {args.batch}",
              "config": {"batch": args.batch, "threads": args.threads, "intra_op": args.intra_op}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
