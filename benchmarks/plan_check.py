"""Check ``genimg plan``'s arithmetic against the demo jobs run on the local stack with 1, 2 and 4 workers.

Every stack first runs a small warm-up job of each profile (Triton's first requests are slow).

1. **Calibrate** (one worker, cpu flavour, this machine): a txt2img job
   (``--cal-prompts`` prompts x 4) and a noise2img job (``--cal-noise``
   items), each alone, shards of 100 as the demo. Per profile: images/s of
   one worker (the job's images over its wall time less the submit and half
   a polling interval: one worker runs the shards back to back, so this
   includes every per-shard cost), CPU seconds per image of the whole stack
   (every process of it, through ``/proc``), mean image bytes (the
   manifest's ``tar_size``), and Redis commands per shard (``INFO stats``).
   Written to ``benchmarks/results/throughput.json``, where ``genimg plan``
   reads them. The job overhead is the txt2img submit (prompt chunks, spec,
   messages) plus half the demo's polling interval.
2. **Predict**: :func:`genimg.plan.simulate` of the demo's two jobs (txt2img:
   every prompt of ``examples/prompts.txt`` x 4; noise2img: 2,000; shards of
   100, queued in that order) on N workers of concurrency 1 sharing the CPUs
   that the rest of the machine left free during the run (host CPU time less
   the stack's own, through ``/proc``: other users of this shared machine are
   an input to the plan, as the GPUs of a cluster are), plus the overhead.
3. **Measure**: ``genimg demo`` (:func:`producer.demo.run_demo`) on a stack of N
   workers, ``--rounds`` times; its ``jobs_wall_s`` (first submit to both jobs
   finished).

Prints a table and writes ``benchmarks/results/plan-check.json``. About 6 minutes on 2 cores.

Usage::

    .venv/bin/python benchmarks/plan_check.py
    .venv/bin/python benchmarks/plan_check.py --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _k in [k for k in os.environ if k.startswith("GENIMG_")]:
    os.environ.pop(_k)  # the stack's own Redis, S3 and Triton

SHARD_SIZE = 100
SUB_BATCH = 100
IMAGES_PER_PROMPT = 4
POLL_S = 0.1
"""Status polling of the calibration jobs."""
DEMO_POLL_S = 0.5
"""``genimg demo``'s status polling (producer.demo.POLL_S)."""


def _self_cpu_s() -> float:
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _stack_pids(state: Any) -> list[int]:
    return [p.pid for p in state.procs.values()]


def _run_alone(client: Any, redis_url: str, state: Any, name: str, **submit: Any) -> dict[str, Any]:
    import redis

    from benchmarks._infra import Sampler

    r = redis.Redis.from_url(redis_url)
    before = int(r.info("stats")["total_commands_processed"])
    with Sampler(_stack_pids(state), interval_s=0.5) as sampler:
        t0 = time.monotonic()
        job = client.submit(output=state.env["GENIMG_OUTPUT"], shard_size=SHARD_SIZE, sub_batch_size=SUB_BATCH,
                            seed=7, name=f"cal-{name}", **submit)
        submit_s = time.monotonic() - t0
        st = job.wait(progress=False, timeout_s=900, poll_s=POLL_S)
        wall = time.monotonic() - t0
    commands = int(r.info("stats")["total_commands_processed"]) - before
    assert st.state == "succeeded", st
    store, layout = client.job_store(job.spec)
    from genimg.shards import committed_shards

    stats = [json.loads(store.get_bytes(layout.stats_key(s))) for s in committed_shards(store, layout)]
    items = job.spec.total_items
    work_s = wall - submit_s - POLL_S / 2  # one worker: its shards back to back, with every per-shard cost
    table = job.manifest()
    sizes = [x for x in table.column("tar_size").to_pylist() if x is not None]
    report = sampler.report()
    generate_s = sum(float(s["seconds"]["generate"]) + float(s["seconds"]["upload"]) for s in stats)
    return {"images_per_s": items / work_s, "cpu_s_per_image": report["cpu_s"] / items,
            "image_bytes": statistics.fmean(sizes), "redis_commands_per_shard": commands / len(stats),
            "submit_s": submit_s, "wall_s": wall, "generate_upload_s": generate_s, "shards": len(stats),
            "items": items, "cpu_s_by_kind": report["cpu_s_by_kind"]}


def warm_up(state: Any, prompts: list[str]) -> None:
    """One small job of each profile after the stack starts: Triton's first requests are slow."""
    saved = dict(os.environ)
    os.environ.update(state.full_env())
    try:
        from producer.client import Client

        with Client() as client:
            out = state.env["GENIMG_OUTPUT"]
            a = client.submit(prompts[:20], images_per_prompt=IMAGES_PER_PROMPT, output=out, shard_size=SHARD_SIZE,
                              sub_batch_size=SUB_BATCH, name="warm-txt")
            b = client.submit(count=200, model="noise2img", output=out, shard_size=SHARD_SIZE,
                              sub_batch_size=SUB_BATCH, name="warm-noise")
            for job in (a, b):
                job.wait(progress=False, timeout_s=600, poll_s=POLL_S)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def predict(profiles: dict[str, Any], workers: int, prompts: int, noise: int, overhead_s: float,
            cpus: float) -> float:
    from genimg.plan import Keda, Load, Profile, simulate

    def prof(name: str) -> Profile:
        p = profiles[name]
        return Profile(images_per_s=p["images_per_s"], image_bytes=p["image_bytes"],
                       cpu_s_per_image=p["cpu_s_per_image"], text=name == "txt2img")

    loads = [Load("txt2img", prompts * IMAGES_PER_PROMPT, SHARD_SIZE, prof("txt2img")),
             Load("noise2img", noise, SHARD_SIZE, prof("noise2img"))]
    keda = Keda(max_pods=workers, concurrency=1, node_start_s=0.0)
    end, _, _, _ = simulate(loads, keda, cpus=cpus, autoscale=False)
    return end + overhead_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=3, help="Demo runs per worker count.")
    parser.add_argument("--cal-prompts", type=int, default=100, help="Calibration txt2img prompts (x 4 images).")
    parser.add_argument("--cal-noise", type=int, default=1000, help="Calibration noise2img images.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plan-check.json")
    parser.add_argument("--throughput-out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    args = parser.parse_args()

    from benchmarks._infra import Sampler, host_busy_s, machine
    from genimg.local import LocalStack
    from producer.client import Client
    from producer.demo import DEFAULT_NOISE_COUNT, read_prompts, run_demo

    prompts = read_prompts(ROOT / "examples" / "prompts.txt", None)
    cpus = float(len(os.sched_getaffinity(0)))
    counts = [int(w) for w in args.workers.split(",")]
    results: dict[str, Any] = {"machine": machine(), "cpus": cpus, "runs": []}
    profiles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="genimg-plancheck-") as tmp:
        for n in counts:
            stack = LocalStack(Path(tmp) / f"stack-{n}")
            state, _ = stack.up(n, say=lambda line: print(f"local: {line}", file=sys.stderr))
            try:
                warm_up(state, prompts)
                if not profiles:
                    assert n == 1, "calibrate with one worker first"
                    saved = dict(os.environ)
                    os.environ.update(state.full_env())
                    try:
                        with Client() as client:
                            profiles["txt2img"] = _run_alone(client, state.env["GENIMG_REDIS_URL"], state, "txt2img",
                                                             prompts=prompts[:args.cal_prompts],
                                                             images_per_prompt=IMAGES_PER_PROMPT)
                            profiles["noise2img"] = _run_alone(client, state.env["GENIMG_REDIS_URL"], state,
                                                               "noise2img", count=args.cal_noise, model="noise2img")
                    finally:
                        os.environ.clear()
                        os.environ.update(saved)
                    print(f"calibration: {json.dumps(profiles)}", file=sys.stderr)
                overhead = profiles["txt2img"]["submit_s"] + DEMO_POLL_S / 2  # first submit; the demo's polling
                for rnd in range(args.rounds):
                    busy0, t0, self0 = host_busy_s(), time.monotonic(), _self_cpu_s()
                    with Sampler(_stack_pids(state), interval_s=0.5) as sampler:
                        overall = run_demo(prompts_path=ROOT / "examples" / "prompts.txt", prompts_limit=None,
                                           images_per_prompt=IMAGES_PER_PROMPT, noise_count=DEFAULT_NOISE_COUNT,
                                           out=Path(tmp) / f"out-{n}", workers=n, shard_size=SHARD_SIZE,
                                           sub_batch_size=SUB_BATCH, seed=rnd, timeout_s=1800, keep_up=True,
                                           progress=False, state_dir=Path(tmp) / f"stack-{n}")
                    span = max(time.monotonic() - t0, 1e-9)
                    ours = sampler.report()["cpu_s"] + _self_cpu_s() - self0
                    others = max(0.0, (host_busy_s() - busy0 - ours) / span)
                    free = max(0.25, cpus - others)
                    predicted = predict(profiles, n, len(prompts), DEFAULT_NOISE_COUNT, overhead, free)
                    measured = float(overall["jobs_wall_s"])
                    run = {"workers": n, "round": rnd, "predicted_s": round(predicted, 2),
                           "measured_s": round(measured, 2), "error": round(predicted / measured - 1, 3),
                           "others_cpus": round(others, 2), "cpus_given_to_plan": round(free, 2),
                           "images_per_s": overall["images_per_s"]}
                    results["runs"].append(run)
                    print(f"workers {n} round {rnd}: predicted {predicted:.1f} s, measured {measured:.1f} s "
                          f"({run['error']:+.1%}), other processes used {others:.2f} CPUs", file=sys.stderr)
            finally:
                stack.down(say=lambda line: print(f"local: {line}", file=sys.stderr))
    results["calibration"] = profiles
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    doc = {"machine": results["machine"]["cpu_model"], "cpus": cpus, "note": "one cpu-flavour worker (concurrency 1)"
           " on the local stack, shards of 100, sub-batches of 100; benchmarks/plan_check.py", "profiles": {
               name: {"images_per_s": round(p["images_per_s"], 2), "cpu_s_per_image": round(p["cpu_s_per_image"], 5),
                      "image_bytes": round(p["image_bytes"], 1),
                      "redis_commands_per_shard": round(p["redis_commands_per_shard"], 1),
                      "text": name == "txt2img", "machine": f"{cpus:.0f} CPUs ({results['machine']['cpu_model']})"}
               for name, p in profiles.items()}}
    args.throughput_out.write_text(json.dumps(doc, indent=1, sort_keys=True))
    print("| workers | runs: predicted / measured s (other processes' CPUs) | median error |")
    print("| --- | --- | --- |")
    for n in counts:
        runs = [r for r in results["runs"] if r["workers"] == n]
        cells = ", ".join(f"{r['predicted_s']:.1f} / {r['measured_s']:.1f} ({r['others_cpus']:.2f})" for r in runs)
        print(f"| {n} | {cells} | {statistics.median(r['error'] for r in runs):+.1%} |")


if __name__ == "__main__":
    main()
