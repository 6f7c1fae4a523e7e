"""The quality filter on the local stack (issue 18): a noise2img job of 2,000 items, keep_if ``score >= 0.9``.

Steps: (1) the job without the filter, whose attempt-0 pass rate ``p`` picks
``regenerate`` (the smallest N with ``count * (1 - p)^(N + 1) < 0.01`` expected
failures); (2) the job with ``keep_if`` and that N; (3) the same job again
(its shards deleted, then ``Job.resume``: every shard runs anew) and another
job with the same seed; (4) the plain job once more (for its wall time). It
reports the pass rate, the tries histogram, regenerations, wall times, and
whether the kept job's tars and members (sha256) are identical on rerun.

    genimg local up --workers 2 && eval "$(genimg local env)"
    .venv/bin/python benchmarks/keep_if.py --out /tmp/keep_if.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import time
from collections import Counter

from genimg.seeds import attempt_seed
from producer import Client

RULE = "score >= 0.9"
SUMMARY_KEYS = ("job", "state", "ok", "failed", "wall_s")


def run(client: Client, output: str, args, job=None, **kw) -> dict:
    """Run a job (or rerun ``job``: delete its shards, resume) and read back its rows, tars and members."""
    t = time.perf_counter()
    if job is None:
        job = client.submit(count=args.count, seed=args.seed, shard_size=args.shard_size, output=output, **kw)
    else:
        store, layout = client.job_store(job.spec)
        store.delete_prefix(layout.shards_prefix)
        job.resume()
    st = job.wait(progress=False, timeout_s=3600)
    wall = time.perf_counter() - t
    store, layout = client.job_store(job.spec)
    tars, members, stats = {}, {}, []
    for s in range(job.spec.shard_plan().num_shards):
        data = store.get_bytes(layout.tar_key(s))
        tars[s] = hashlib.sha256(data).hexdigest()
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf.getmembers():
                members[m.name] = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
        stats.append(json.loads(store.get_bytes(layout.stats_key(s))))
    return {"handle": job, "job": job.job_id, "state": st.state, "ok": st.items_done, "failed": st.items_failed,
            "wall_s": round(wall, 2), "rows": job.manifest().to_pylist(), "tars": tars, "members": members,
            "stats": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--bucket", default="genimg-local")
    ap.add_argument("--out", default=None, help="write the report (JSON) here")
    args = ap.parse_args()
    base = f"s3://{args.bucket}/keep-if-bench-{int(time.time())}"
    with Client() as c:
        plain = run(c, f"{base}/plain", args)
        p = sum(r["score"] is not None and r["score"] >= 0.9 for r in plain["rows"]) / args.count
        n = next((k for k in range(65) if args.count * (1 - p) ** (k + 1) < 0.01), 64)
        kept = run(c, f"{base}/kept", args, keep_if=RULE, regenerate=n)
        rerun = run(c, f"{base}/kept", args, job=kept["handle"])
        other = run(c, f"{base}/kept-other", args, keep_if=RULE, regenerate=n)
        plain2 = run(c, f"{base}/plain-again", args)
    rows, by_index = kept["rows"], {r["item_index"]: r for r in plain["rows"]}
    tries = Counter(r["tries"] for r in rows)
    png = lambda m: {k: v for k, v in m.items() if k.endswith(".png")}  # noqa: E731 - a job's json names its id
    report = {
        "count": args.count, "seed": args.seed, "rule": RULE, "pass_rate_attempt0": p, "regenerate": n,
        "expected_unmet": args.count * (1 - p) ** (n + 1),
        **{name: {k: r[k] for k in SUMMARY_KEYS} for name, r in
           (("plain", plain), ("plain_again", plain2), ("kept", kept), ("kept_rerun", rerun), ("kept_other", other))},
        "kept_ok": sum(r["status"] == "ok" for r in rows),
        "kept_all_pass": all(r["score"] is not None and r["score"] >= 0.9 for r in rows),
        "kept_min_score": min((r["score"] for r in rows if r["score"] is not None), default=None),
        "seeds_are_attempt_seeds": all(r["seed"] == attempt_seed(args.seed, r["item_index"], r["tries"] - 1)
                                       for r in rows),
        "tries": dict(sorted(tries.items())), "mean_tries": sum(r["tries"] for r in rows) / len(rows),
        "regenerations": sum(r["tries"] - 1 for r in rows),
        "regenerations_in_stats": sum(s["keep_if"]["regenerated"] for s in kept["stats"]),
        "attempt0_identical_to_plain": all(r["sha256"] == by_index[r["item_index"]]["sha256"]
                                           for r in rows if r["tries"] == 1),
        "rerun_same_job": rerun["job"] == kept["job"],
        "rerun_tars_identical": kept["tars"] == rerun["tars"],
        "rerun_members_identical": kept["members"] == rerun["members"], "members": len(kept["members"]),
        "other_job_images_identical": png(kept["members"]) == png(other["members"]),
        "kept_tar_sha256": kept["tars"],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
