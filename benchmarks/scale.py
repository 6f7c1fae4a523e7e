"""``make scale``: what the end of a big job costs, on this machine, at 10^4 and 10^5 shards (any sizes given).

For each size it fabricates the committed state of a noise2img job of
``shards x shard_size`` items through genimg's own code, then runs the real
operations against it, each in a fresh child process so that its peak RSS
is its own:

1. **submit** (``Client.submit``: job.json, spec, one task message per shard
   on a private ``redis-server``); then the **exporter scrape** (the real
   ``genimg exporter`` collector behind its HTTP server, median of 5 GETs of
   ``/metrics`` while every message is queued); then the queue is emptied
   (no worker runs).
2. **fabricate** (2 processes): per shard a real :class:`~genimg.shards.ShardPayload`
   through :func:`~genimg.shards.commit_shard` (zero-byte tar, real stats JSON, a
   real index of ``shard_size`` rows: 0.1 % failed items, random uint64 seeds and
   random sha256 values so the Parquet has a realistic size; the per-shard
   columns are filled with numpy instead of running 10^8 ``ShardItem`` objects
   through the writer), then :func:`genimg.jobs.mark_done` and
   :func:`genimg.jobs.compact_part_if_complete`, as a worker does. The last
   manifest part is left uncompacted (its worker "died"), so the finaliser has
   a part to write.
3. **finalise**: :func:`genimg.jobs.finalize_if_complete` (what the last worker runs).
4. **status**: ``Job.status``.
5. **rebuild (wait)**: every manifest part, ``_SUCCESS`` and the Redis summary
   deleted, then ``Job.wait``: the finalisation when no worker compacted or
   finalised anything (every part built from 10^N indexes).
6. **resume scan**: ``Job.resume`` with Redis intact (lists the shards, finds
   nothing to do), and **resume after Redis loss** (the job's Redis keys
   deleted: the done-hash is rebuilt from every shard's stats).
7. **Redis bytes**: ``MEMORY USAGE`` (every element) of the job's keys.

``--s3-shards`` runs the same against moto's S3 server (objects in memory,
so smaller); ``--enqueue-shards`` measures ``Client.enqueue_shards`` of that
many messages, the queue's Redis memory, and a done-hash of that many
shards (filled with the real ``mark_done`` script) with the cost of reading
a job's counts. Results go to ``--out`` (JSON) and a table on stdout, with
the slope of each cost against shards and its growth exponent (log-log, 1 is
linear).

Usage::

    .venv/bin/python benchmarks/scale.py                              # 10^4, 10^5 shards; S3 2,000; enqueue 10^6
    .venv/bin/python benchmarks/scale.py --shards 1000 --s3-shards 0 --enqueue-shards 0   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUCKET = "genimg-scale"
FAILED_EVERY = 1000
"""One item in this many is recorded failed (``non_finite_output``)."""


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------ children


def _client(cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    from genimg.settings import SpecSettings, StorageSettings
    from producer.client import Client

    storage = StorageSettings(s3_endpoint_url=cfg.get("endpoint") or None, s3_access_key_id=SecretStr("bench"),
                              s3_secret_access_key=SecretStr("bench"))
    return Client(cfg["redis_url"], queue=cfg["queue"], key_prefix=cfg["prefix"], storage=storage,
                  spec_settings=SpecSettings(local_output_root=Path(cfg["root"])))


def op_submit(cfg: dict[str, Any]) -> dict[str, Any]:
    """Submit the job (real enqueue), scrape the exporter while every message is queued, empty the queue."""
    import redis

    from genimg.exporter import make_registry, redis_client, start_exporter
    from genimg.queue import priority_lists
    from benchmarks._infra import free_port

    client = _client(cfg)
    client._app()
    enqueue_s = 0.0
    original = client.enqueue_shards

    def timed(spec, shards):  # type: ignore[no-untyped-def]
        nonlocal enqueue_s
        t = time.perf_counter()
        try:
            return original(spec, shards)
        finally:
            enqueue_s = time.perf_counter() - t

    client.enqueue_shards = timed  # type: ignore[method-assign]
    r = redis.Redis.from_url(cfg["redis_url"])
    before = int(r.info("memory")["used_memory"])
    t0 = time.perf_counter()
    job = client.submit(count=cfg["shards"] * cfg["shard_size"], shard_size=cfg["shard_size"], model="noise2img",
                        output=cfg["output"], seed=1)
    submit_s = time.perf_counter() - t0
    lists = priority_lists(cfg["queue"])
    queued = sum(r.llen(name) for name in lists)
    queue_bytes = sum(int(r.memory_usage(name, samples=0) or 0) for name in lists)
    used = int(r.info("memory")["used_memory"]) - before

    server = start_exporter(make_registry(redis_client(cfg["redis_url"], 3.0), [cfg["queue"]]), free_port(),
                            "127.0.0.1")
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    scrapes, body = [], ""
    for _ in range(5):
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = resp.read().decode()
        scrapes.append(time.perf_counter() - t)
    server.shutdown()
    assert f'genimg_backlog_shards{{kind="total",queue="{cfg["queue"]}"}} {float(queued)}' in body, body
    for name in lists:
        r.delete(name)
    client.close()
    return {"job_id": job.job_id, "submit_s": submit_s, "enqueue_s": enqueue_s, "messages": queued,
            "queue_bytes": queue_bytes, "redis_used_delta_bytes": used, "scrape_s": statistics.median(scrapes),
            "peak_rss_mib": _rss_mib()}


def _template(spec, layout):  # type: ignore[no-untyped-def]
    """Shard 0 through the real writer: the columns every fabricated index copies."""
    from genimg.manifest import job_schema
    from genimg.shards import ShardItem, build_shard

    items = []
    for i in range(spec.shard_size):
        common: dict[str, Any] = dict(item_index=i, seed=i, model=spec.profile.triton_model, model_version="scale",
                                      profile=spec.profile.name, params=spec.params, infer_s=0.004, encode_s=0.001)
        if i % FAILED_EVERY == FAILED_EVERY - 1:
            items.append(ShardItem(**common, reason="non_finite_output", extra={"label": None, "score": None}))
        else:
            items.append(ShardItem(**common, image=i.to_bytes(8, "little"), format="png", width=112, height=112,
                                   extra={"label": i % 10, "score": 0.5 + (i % 50) / 100}))
    return build_shard(layout, 0, items, job_schema(spec))


def _payload(template, layout, shard: int):  # type: ignore[no-untyped-def]
    """``template`` moved to ``shard``: item indices, keys, tar key, seeds and sha256 values of its own."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from genimg.shards import ShardPayload
    from genimg.index import index_to_parquet

    t = template.index
    n = t.num_rows
    base = shard * n
    ok = pc.equal(t["status"], "ok")
    digits = "".join(f"{i:09d}" for i in range(base, base + n)).encode()
    keys = pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 9 * n + 1, 9, dtype=np.int32)),
                                       pa.py_buffer(digits))
    sha = pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 64 * n + 1, 64, dtype=np.int32)),
                                      pa.py_buffer(os.urandom(32 * n).hex().encode()))
    rng = np.random.default_rng(shard)
    columns = {
        "item_index": pa.array(np.arange(base, base + n, dtype=np.int64)),
        "key": keys,
        "shard_index": pa.array(np.full(n, shard, dtype=np.int32)),
        "tar_key": pc.if_else(ok, pa.scalar(layout.tar_key(shard)), pa.scalar(None, pa.string())),
        "seed": pa.array(rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)),
        "sha256": pc.if_else(ok, sha, pa.scalar(None, pa.string())),
    }
    for name, array in columns.items():
        i = t.schema.get_field_index(name)
        t = t.set_column(i, t.schema.field(name), array)
    return ShardPayload(shard_index=shard, tar_bytes=b"", index=t, index_bytes=index_to_parquet(t),
                        counts=dict(template.counts), failed_by_reason=dict(template.failed_by_reason),
                        seconds=dict(template.seconds))


def op_fabricate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Commit this process's share of the parts' shards, mark them done, compact parts as ranges complete."""
    import redis

    from genimg import jobs
    from genimg.stores.files import FileStore
    from genimg.manifest import PartPlan
    from genimg.shards import commit_shard
    from genimg.layout import Layout

    client = _client(cfg)
    spec = client.job(cfg["job_id"], output=cfg["output"]).spec
    store, layout = client.job_store(spec)
    if isinstance(store, FileStore):
        store = FileStore(store.root, durable=False)  # scratch data: no fsync per file while fabricating
    layout = Layout(bucket=store.bucket, prefix=layout.prefix, job_id=layout.job_id)
    r, keys = redis.Redis.from_url(cfg["redis_url"]), client.keys
    plan = PartPlan.for_spec(spec)
    template = _template(spec, layout)
    ok, bad = template.counts["items_ok"], template.counts["items_failed"]
    shards = compact_s = compact_max = 0.0
    t0 = time.perf_counter()
    for part in range(cfg["k"], plan.num_parts, cfg["m"]):
        start, stop = plan.part_range(part)
        for shard in range(start, stop):
            commit_shard(store, layout, shard, _payload(template, layout, shard))
            jobs.mark_done(r, keys, spec.job_id, shard, ok, bad)
            shards += 1
        if part != plan.num_parts - 1:  # the last part's worker "died" before compacting it
            t = time.perf_counter()
            assert jobs.compact_part_if_complete(r, keys, store, layout, spec, stop - 1)
            compact_s += time.perf_counter() - t
            compact_max = max(compact_max, time.perf_counter() - t)
    client.close()
    return {"shards": int(shards), "seconds": time.perf_counter() - t0, "compact_s": compact_s,
            "compact_max_part_s": compact_max, "peak_rss_mib": _rss_mib()}


def _job(cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    client = _client(cfg)
    return client, client.job(cfg["job_id"], output=cfg["output"])


def op_finalise(cfg: dict[str, Any]) -> dict[str, Any]:
    from genimg import jobs

    client, job = _job(cfg)
    store, layout = client.job_store(job.spec)
    t = time.perf_counter()
    assert jobs.finalize_if_complete(client.redis, client.keys, store, layout, job.spec)
    seconds = time.perf_counter() - t
    summary = job.status().summary
    assert summary["items_ok"] + summary["items_failed"] == job.spec.total_items, summary
    return {"seconds": seconds, "rows": summary["manifest"]["rows"], "parts": summary["manifest"]["parts"],
            "manifest_bytes": summary["manifest"]["bytes"], "peak_rss_mib": _rss_mib()}


def op_status(cfg: dict[str, Any]) -> dict[str, Any]:
    client, job = _job(cfg)
    job.status()  # the spec read and the connection, not the cost of a status
    times = []
    for _ in range(5):
        t = time.perf_counter()
        st = job.status()
        times.append(time.perf_counter() - t)
    assert st.shards_done == cfg["shards"], st
    return {"seconds": statistics.median(times), "peak_rss_mib": _rss_mib()}


def op_rebuild(cfg: dict[str, Any]) -> dict[str, Any]:
    """Delete every part, _SUCCESS and the summary; ``Job.wait`` finalises from the shard indexes alone."""
    from genimg.layout import SUCCESS_OBJECT

    client, job = _job(cfg)
    store, layout = client.job_store(job.spec)
    store.delete_prefix(layout.manifest_prefix)
    store.delete_prefix(f"{layout.job_prefix}/{SUCCESS_OBJECT}")
    client.redis.delete(client.keys.job(job.job_id, "summary"))
    t = time.perf_counter()
    st = job.wait(progress=False, poll_s=0.1)
    seconds = time.perf_counter() - t
    assert st.summary is not None and st.summary["manifest"]["rows"] == job.spec.total_items
    return {"seconds": seconds, "peak_rss_mib": _rss_mib()}


def op_resume(cfg: dict[str, Any]) -> dict[str, Any]:
    client, job = _job(cfg)
    job.spec  # noqa: B018 - read before the clock
    t = time.perf_counter()
    assert job.resume() == 0
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": _rss_mib()}


def op_resume_lost(cfg: dict[str, Any]) -> dict[str, Any]:
    """Redis lost the job: resume rebuilds the done-hash from every shard's stats, then finalises."""
    client, job = _job(cfg)
    for key in client.redis.scan_iter(f"{cfg['prefix']}:job:{cfg['job_id']}:*", count=1000):
        client.redis.delete(key)
    job = client.job(cfg["job_id"], output=cfg["output"])
    t = time.perf_counter()
    assert job.resume() == 0
    seconds = time.perf_counter() - t
    st = job.status()
    assert st.shards_done == cfg["shards"] and st.items_done + st.items_failed == job.spec.total_items
    return {"seconds": seconds, "peak_rss_mib": _rss_mib()}


def op_redis_bytes(cfg: dict[str, Any]) -> dict[str, Any]:
    import redis

    r = redis.Redis.from_url(cfg["redis_url"])
    per_key = {k.decode().rsplit(":", 1)[-1]: int(r.memory_usage(k, samples=0) or 0)
               for k in r.scan_iter(f"{cfg['prefix']}:job:{cfg['job_id']}:*", count=1000)}
    return {"job_bytes": sum(per_key.values()), "per_key": per_key,
            "done_bytes_per_shard": per_key.get("done", 0) / cfg["shards"]}


def op_enqueue(cfg: dict[str, Any]) -> dict[str, Any]:
    """``enqueue_shards`` of ``shards`` messages and a done-hash of as many shards (the real Lua script)."""
    import redis

    from genimg import jobs
    from genimg.queue import priority_lists
    from genimg.spec import JobSpec

    client = _client(cfg)
    client._app()
    n = cfg["shards"]
    spec = JobSpec.create(settings=client.spec_settings, model="noise2img", count=n, shard_size=1,
                          output=cfg["output"])
    r = redis.Redis.from_url(cfg["redis_url"])
    before = int(r.info("memory")["used_memory"])
    t = time.perf_counter()
    sent = client.enqueue_shards(spec, range(n))
    enqueue_s = time.perf_counter() - t
    lists = priority_lists(cfg["queue"])
    queue_bytes = sum(int(r.memory_usage(name, samples=0) or 0) for name in lists)
    used = int(r.info("memory")["used_memory"]) - before
    for name in lists:
        r.delete(name)
    jobs.store_spec(r, client.keys, spec)
    k = client.keys.job
    t = time.perf_counter()
    for i in range(0, n, 10_000):
        pipe = r.pipeline(transaction=False)
        for s in range(i, min(n, i + 10_000)):
            pipe.eval(jobs._MARK_DONE, 4, k(spec.job_id, "done"), k(spec.job_id, "failed"),
                      k(spec.job_id, "running"), k(spec.job_id, "totals"), str(s), "1,0", 1, 0)
        pipe.execute()
    mark_s = time.perf_counter() - t
    done_bytes = int(r.memory_usage(k(spec.job_id, "done"), samples=0) or 0)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        c = jobs.counts(r, client.keys, spec)
        times.append(time.perf_counter() - t)
    assert c.shards_done == n and c.finished
    for key in r.scan_iter(f"{cfg['prefix']}:*", count=1000):
        r.delete(key)
    client.close()
    return {"messages": sent, "enqueue_s": enqueue_s, "messages_per_s": sent / enqueue_s,
            "queue_bytes": queue_bytes, "queue_bytes_per_message": queue_bytes / max(1, sent),
            "redis_used_delta_bytes": used, "mark_done_s": mark_s, "done_bytes": done_bytes,
            "done_bytes_per_shard": done_bytes / n, "counts_s": statistics.median(times), "peak_rss_mib": _rss_mib()}


OPS = {f.__name__[3:]: f for f in (op_submit, op_fabricate, op_finalise, op_status, op_rebuild, op_resume,
                                   op_resume_lost, op_redis_bytes, op_enqueue)}


# ------------------------------------------------------------------------------------------ driver


def _child(op: str, cfg: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--child", op, "--cfg", json.dumps(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str], op: str, timeout_s: float = 7200) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{op} failed ({proc.returncode}): {err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run(op: str, cfg: dict[str, Any]) -> dict[str, Any]:
    t = time.perf_counter()
    res = _result(_child(op, cfg), op)
    print(f"  {op:<12} {time.perf_counter() - t:8.1f} s  {json.dumps(res)[:160]}", file=sys.stderr, flush=True)
    return res


def one_size(shards: int, shard_size: int, store: str, redis_url: str, root: Path, endpoint: str | None,
             workers: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    output = f"file://{root}/{tag}" if store == "file" else f"s3://{BUCKET}/{tag}"
    cfg: dict[str, Any] = {"shards": shards, "shard_size": shard_size, "redis_url": redis_url, "root": str(root),
                           "endpoint": endpoint, "output": output, "queue": f"genimg-scale-{tag}",
                           "prefix": f"genimg-scale-{tag}"}
    print(f"{store}: {shards:,} shards of {shard_size:,} items", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"store": store, "shards": shards, "shard_size": shard_size, "items": shards * shard_size}
    out["submit"] = run("submit", cfg)
    cfg["job_id"] = out["submit"]["job_id"]
    t = time.perf_counter()
    procs = [_child("fabricate", {**cfg, "k": k, "m": workers}) for k in range(workers)]
    fab = [_result(p, "fabricate") for p in procs]
    out["fabricate"] = {"seconds": time.perf_counter() - t, "shards": sum(f["shards"] for f in fab),
                        "compact_s": sum(f["compact_s"] for f in fab),
                        "compact_max_part_s": max(f["compact_max_part_s"] for f in fab),
                        "peak_rss_mib": max(f["peak_rss_mib"] for f in fab)}
    print(f"  fabricate    {out['fabricate']['seconds']:8.1f} s  {json.dumps(out['fabricate'])}", file=sys.stderr)
    for op in ("redis_bytes", "finalise", "status", "rebuild", "resume", "resume_lost"):
        out[op] = run(op, cfg)
    if store == "file":
        out["disk_bytes"] = sum(p.stat().st_size for p in (root / tag).rglob("*") if p.is_file())
        shutil.rmtree(root / tag, ignore_errors=True)
    else:
        from benchmarks._infra import empty_prefix

        empty_prefix(endpoint, BUCKET, f"{tag}/")
    import redis

    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(f"{cfg['prefix']}:*", count=1000):
        r.delete(key)
    return out


def _fit(rows: list[dict[str, Any]], get) -> dict[str, float] | None:  # type: ignore[no-untyped-def]
    pts = [(r["shards"], get(r)) for r in rows]
    pts = [(x, y) for x, y in pts if y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    return {"slope_per_1000_shards": slope * 1000, "intercept": my - slope * mx,
            "exponent": math.log(y1 / y0) / math.log(x1 / x0)}


METRICS = {
    "finalise_s": lambda r: r["finalise"]["seconds"],
    "finalise_rss_mib": lambda r: r["finalise"]["peak_rss_mib"],
    "rebuild_s": lambda r: r["rebuild"]["seconds"],
    "rebuild_rss_mib": lambda r: r["rebuild"]["peak_rss_mib"],
    "status_s": lambda r: r["status"]["seconds"],
    "scrape_s": lambda r: r["submit"]["scrape_s"],
    "enqueue_s": lambda r: r["submit"]["enqueue_s"],
    "resume_s": lambda r: r["resume"]["seconds"],
    "resume_lost_s": lambda r: r["resume_lost"]["seconds"],
    "redis_job_bytes": lambda r: r["redis_bytes"]["job_bytes"],
    "queue_bytes": lambda r: r["submit"]["queue_bytes"],
    "compact_max_part_s": lambda r: r["fabricate"]["compact_max_part_s"],
}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| store | shards | items | finalise s | finalise peak RSS MiB | rebuild (wait) s | rebuild peak RSS MiB "
            "| status s | exporter scrape s | resume s | resume after Redis loss s | enqueue s "
            "| Redis bytes (job) | Redis bytes (queue) |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['store']} | {r['shards']:,} | {r['items']:,} | {r['finalise']['seconds']:.2f} "
            f"| {r['finalise']['peak_rss_mib']:.0f} | {r['rebuild']['seconds']:.1f} | {r['rebuild']['peak_rss_mib']:.0f} "
            f"| {r['status']['seconds'] * 1000:.2f} ms | {r['submit']['scrape_s'] * 1000:.1f} ms "
            f"| {r['resume']['seconds']:.2f} | {r['resume_lost']['seconds']:.1f} | {r['submit']['enqueue_s']:.1f} "
            f"| {r['redis_bytes']['job_bytes']:,} | {r['submit']['queue_bytes']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="10000,100000", help="Sizes on the local file store.")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--s3-shards", type=int, default=2000, help="Size on moto's S3 server (0: skip).")
    parser.add_argument("--enqueue-shards", type=int, default=1_000_000, help="Messages to enqueue (0: skip).")
    parser.add_argument("--workers", type=int, default=2, help="Fabricating processes.")
    parser.add_argument("--dir", type=Path, default=ROOT / ".cache" / "scale", help="Where the file store lives.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale-latest.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cfg", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(OPS[args.child](json.loads(args.cfg))))
        return

    from benchmarks._infra import machine, start_moto, start_redis, stop

    sizes = [int(s) for s in args.shards.split(",") if s]
    args.dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {"machine": machine(), "shard_size": args.shard_size, "sizes": [], "s3": None,
                               "enqueue": None}
    with tempfile.TemporaryDirectory(prefix="genimg-scale-") as tmp:
        redis_server = start_redis(Path(tmp))
        moto = start_moto(Path(tmp)) if args.s3_shards else None
        try:
            for n in sizes:
                results["sizes"].append(one_size(n, args.shard_size, "file", redis_server.url, args.dir, None,
                                                 args.workers))
            if moto is not None:
                from benchmarks._infra import s3_client

                s3_client(moto.url).create_bucket(Bucket=BUCKET)
                results["s3"] = one_size(args.s3_shards, args.shard_size, "s3", redis_server.url, args.dir,
                                         moto.url, args.workers)
            if args.enqueue_shards:
                tag = uuid.uuid4().hex[:8]
                results["enqueue"] = run("enqueue", {"shards": args.enqueue_shards, "redis_url": redis_server.url,
                                                     "root": str(args.dir), "endpoint": None,
                                                     "output": f"file://{args.dir}/{tag}",
                                                     "queue": f"genimg-scale-{tag}", "prefix": f"genimg-scale-{tag}"})
        finally:
            if moto is not None:
                stop(moto.proc)
            stop(redis_server.proc)
    rows = results["sizes"]
    results["fits"] = {name: _fit(rows, get) for name, get in METRICS.items()}
    results["total_seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(table(rows + ([results["s3"]] if results["s3"] else [])))
    print()
    for name, fit in results["fits"].items():
        if fit:
            print(f"{name:<20} slope {fit['slope_per_1000_shards']:.4g} per 1,000 shards, exponent {fit['exponent']:.2f}")
    if results["enqueue"]:
        e = results["enqueue"]
        print(f"\nenqueue {e['messages']:,} messages: {e['enqueue_s']:.1f} s ({e['messages_per_s']:,.0f}/s), "
              f"queue {e['queue_bytes'] / 2**20:,.0f} MiB ({e['queue_bytes_per_message']:.0f} B/message); "
              f"done-hash {e['done_bytes'] / 2**20:,.1f} MiB ({e['done_bytes_per_shard']:.1f} B/shard); "
              f"counts {e['counts_s'] * 1000:.2f} ms")
    print(f"\nwritten to {args.out} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
