"""Where a genimg worker's CPU goes, stage by stage, for one txt2img job run in this process.

Runs the shards of a job the way a worker does (:func:`genimg.lifecycle.process_shard`
with the worker's context) in this process, against a running stack whose own
workers are stopped, and adds up ``time.thread_time()`` around each stage
function in every thread (PNG encoding, pHashes, the gRPC client's calls,
inputs, seeds, the prompt stage, the commit: tar, index, uploads; the job's
finalisation after its last shard). A stage's figure excludes nothing nested
in it, so the rows overlap where one stage calls another (``commit_shard`` holds
``ShardWriter.build``, which holds ``write_tar``). CPU spent in gRPC's own C
threads is in the process total only. Prints milliseconds of CPU per image
(issue 20; benchmarks/README.md, "Where the CPU per image goes").

    genimg local up --workers 0 && eval "$(genimg local env)"
    python benchmarks/worker_cpu.py --images 4000 --shard-size 1000
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import genimg.imaging as imaging  # noqa: E402
import genimg.jobs as jobs  # noqa: E402
import genimg.lifecycle as lifecycle  # noqa: E402
import genimg.pipeline as pipeline  # noqa: E402
import genimg.shards as shards  # noqa: E402
from genimg.stores.s3 import S3Store  # noqa: E402
from genimg.triton.client import InferenceClient  # noqa: E402

STAGES = [(imaging, "encode"), (imaging, "phashes"), (InferenceClient, "infer"), (pipeline, "build_inputs"),
          (pipeline, "item_seeds"), (pipeline.PromptStageCache, "gather"), (pipeline, "load_prompts"),
          (pipeline, "read_images"), (pipeline, "read_metadata"), (pipeline, "commit_shard"),
          (shards.ShardWriter, "build"), (shards, "write_tar"), (shards, "index_to_parquet"), (S3Store, "put_bytes"),
          (jobs, "finalize_if_complete")]
"""(owner, function name) of each stage timed; ``pipeline``'s names are the ones ``run_shard`` calls."""


def instrument(cpu: collections.Counter) -> None:
    """Wrap each of :data:`STAGES` to add its calling thread's CPU seconds to ``cpu[name]``."""
    lock = threading.Lock()
    for owner, name in STAGES:
        fn = getattr(owner, name)

        def timed(*a, _fn=fn, _name=name, **k):
            t = time.thread_time()
            try:
                return _fn(*a, **k)
            finally:
                with lock:
                    cpu[_name] += time.thread_time() - t

        setattr(owner, name, functools.wraps(fn)(timed))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--sub-batch-size", type=int, default=256)
    ap.add_argument("--infer-inflight", type=int, default=2)
    ap.add_argument("--output", default="s3://genimg-local/worker-cpu")
    args = ap.parse_args(argv)

    from producer import Client
    from workers.app import context

    prompts = [f"the digit {i % 10}, study {i}" for i in range(-(-args.images // args.images_per_prompt))]
    with Client() as client:  # the first job warms clients, sessions and Triton's arenas; the second is measured
        specs = [client.submit(prompts, images_per_prompt=args.images_per_prompt, seed=1234 + k,
                               output=f"{args.output}/{time.time_ns()}", shard_size=args.shard_size,
                               sub_batch_size=args.sub_batch_size, image_format="png", upscale=True).spec
                 for k in range(2)]
    ctx = context()

    def run(spec) -> tuple[float, float]:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for shard in range(spec.shard_plan().num_shards):
            lifecycle.process_shard(ctx.redis, ctx.keys, spec, shard, stores=ctx.store_for, infer=ctx.infer,
                                    worker="worker-cpu", infer_inflight=args.infer_inflight, encode_threads=1)
        return time.process_time() - cpu0, time.perf_counter() - t0

    run(specs[0])
    cpu: collections.Counter = collections.Counter()
    instrument(cpu)
    total, wall = run(specs[1])
    n = specs[1].total_items
    report = {"images": n, "wall_s": round(wall, 3), "process_ms_per_image": round(1000 * total / n, 3),
              "stage_ms_per_image": {k: round(1000 * v / n, 3) for k, v in cpu.most_common()}}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
