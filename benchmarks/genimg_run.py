"""One genimg job, timed from ``Client.submit`` to the last committed shard (the producer side of a bench run).

Reads the deployment from ``GENIMG_*`` (Redis URL, queue, key prefix, S3
endpoint and credentials, profiles directory), submits a job of ``--model``
(a text profile with ``--prompts``, a noise profile with ``--count``; PNG,
upscaled) and polls
Redis every 50 ms (two HLENs). ``seconds`` ends when every shard is committed
(the job's done and failed shard hashes hold every shard: a shard is counted
after its index, the commit marker, is written); ``job_seconds`` ends when the job's manifest
and ``_SUCCESS`` exist. Then reads each shard's stats object for per-shard
stage seconds. Prints one JSON object.

    python benchmarks/genimg_run.py --prompts P.txt --images-per-prompt 4 --output s3://bucket/run1 \\
        --shard-size 250 --sub-batch-size 64
    python benchmarks/genimg_run.py --model faces_x4 --count 1000 --output s3://bucket/run2 --shard-size 250
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

POLL_S = 0.05


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="profile (default: txt2img with --prompts, noise2img with --count)")
    ap.add_argument("--prompts", default=None, help="text profiles: one prompt a line")
    ap.add_argument("--images-per-prompt", type=int, default=None)
    ap.add_argument("--count", type=int, default=None, help="noise profiles: images")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--output", required=True)
    ap.add_argument("--shard-size", type=int, default=None, help="default: JobSpec's")
    ap.add_argument("--sub-batch-size", type=int, default=None, help="default: JobSpec's")
    ap.add_argument("--timeout-s", type=float, default=900)
    args = ap.parse_args(argv)

    from genimg.stores import open_job_store
    from producer import Client
    from producer.client import UPLOAD_THREADS

    prompts = Path(args.prompts).read_text(encoding="utf-8").splitlines() if args.prompts else None
    with Client() as client:
        client.redis.ping()
        client._app()  # the broker connection a long-lived client already has
        open_job_store(args.output, "0" * 32, client.storage_settings, callers=UPLOAD_THREADS,
                       cache=client._stores)  # and the S3 client it has for the bucket
        setup_cpu_s = time.process_time()
        t0_epoch, t0 = time.time(), time.perf_counter()
        job = client.submit(prompts, count=args.count, model=args.model, images_per_prompt=args.images_per_prompt,
                            output=args.output, seed=args.seed, shard_size=args.shard_size,
                            sub_batch_size=args.sub_batch_size, image_format="png", upscale=True)
        t_submitted = time.perf_counter()
        total, shards = job.spec.total_items, job.spec.shard_plan().num_shards
        r, jid = client.redis, job.job_id
        done_key, failed_key = client.keys.job(jid, "done"), client.keys.job(jid, "failed")
        deadline = t0 + args.timeout_s
        while True:  # a cheap poll: two HLENs (Job.status() reads more; at 20 ms it cost ~0.5 ms CPU/image)
            pipe = r.pipeline()
            pipe.hlen(done_key)
            pipe.hlen(failed_key)
            if sum(pipe.execute()) >= shards:
                break
            if time.perf_counter() > deadline:
                raise SystemExit(f"job {jid} did not finish: {job.status()}")
            time.sleep(POLL_S)
        t_commit = time.perf_counter()
        window_cpu_s = time.process_time() - setup_cpu_s
        st = job.wait(progress=False, timeout_s=args.timeout_s, poll_s=0.1)
        t_done = time.perf_counter()
        if st.items_failed:
            raise SystemExit(f"job {job.job_id}: {st.items_failed} items failed")
        store, layout = client.job_store(job.spec)
        stats = [json.loads(store.get_bytes(layout.stats_key(s))) for s in range(job.spec.shard_plan().num_shards)]
    seconds = t_commit - t0
    stages = ("infer", "encode", "upload", "generate")
    report = {"images": total, "seconds": round(seconds, 3), "images_per_s": round(total / seconds, 2),
              "submit_s": round(t_submitted - t0, 3), "setup_cpu_s": round(setup_cpu_s, 3),
              "t0_epoch": round(t0_epoch, 3), "t1_epoch": round(t0_epoch + seconds, 3),
              "producer_cpu_s_in_window": round(window_cpu_s, 3), "job_seconds": round(t_done - t0, 3),
              "bytes": int(sum(s["tar_bytes"] for s in stats)), "objects_per_shard": 3,
              "stage_unit": f"shard of {job.spec.shard_size}",
              "stage_samples": {k: [round(float(s["seconds"].get(k, 0.0)), 5) for s in stats] for k in stages},
              "config": {"model": job.spec.profile.name, "shard_size": job.spec.shard_size,
                         "sub_batch_size": job.spec.sub_batch_size},
              "job_id": job.job_id}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
