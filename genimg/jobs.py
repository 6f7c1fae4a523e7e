"""Job bookkeeping in Redis (see :mod:`genimg.queue` for the key layout) and job finalisation.

Every write here is idempotent: a shard committed twice, or a finaliser run
twice, leaves the same state.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass

import redis

from genimg.errors import QueueUnavailableError, StorageNotFoundError
from genimg.queue import Keys, describe_redis_error
from genimg.shards import Layout, build_manifest
from genimg.spec import JobSpec
from genimg.storage import ObjectStore

log = logging.getLogger(__name__)

SPEC_OBJECT = "job.json"
SUCCESS_OBJECT = "_SUCCESS"


def _redis_op(what: str):
    """Decorator translating redis-py errors into QueueUnavailableError."""

    def wrap(fn):
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except redis.RedisError as e:
                raise QueueUnavailableError(f"Redis unavailable during {what}: {describe_redis_error(e)}") from e

        inner.__name__ = fn.__name__
        inner.__doc__ = fn.__doc__
        return inner

    return wrap


@dataclass(frozen=True)
class JobCounts:
    """Progress of one job as Redis knows it."""

    num_shards: int
    shards_done: int
    shards_failed: int
    shards_running: int
    items_ok: int
    items_failed: int
    cancelled: bool

    @property
    def finished(self) -> bool:
        return self.shards_done + self.shards_failed >= self.num_shards

    @property
    def state(self) -> str:
        if self.cancelled:
            return "cancelled"
        if self.finished:
            return "failed" if self.shards_failed or self.items_failed else "succeeded"
        return "running" if self.shards_done or self.shards_running or self.shards_failed else "queued"


@_redis_op("store spec")
def store_spec(r: redis.Redis, keys: Keys, spec: JobSpec) -> None:
    """Record a job's spec and its submit time in Redis."""
    pipe = r.pipeline()
    pipe.set(keys.job(spec.job_id, "spec"), spec.to_json())
    pipe.zadd(keys.jobs, {spec.job_id: spec.created_at.timestamp()})
    pipe.execute()


def load_spec(r: redis.Redis, keys: Keys, store: ObjectStore | None, layout: Layout | None,
              job_id: str) -> JobSpec:
    """The job's spec from Redis, else from storage's ``job.json`` (after a Redis flush).

    Raises:
        StorageNotFoundError: the job is known to neither.
        ValidationError: the stored spec is invalid (e.g. edited by hand).
    """
    try:
        raw = r.get(keys.job(job_id, "spec"))
    except redis.RedisError as e:
        raise QueueUnavailableError(f"Redis unavailable reading job {job_id}: {type(e).__name__}") from e
    if raw is None:
        if store is None or layout is None:
            raise StorageNotFoundError(f"job {job_id} is unknown")
        raw = store.get_bytes(f"{layout.job_prefix}/{SPEC_OBJECT}")
    return JobSpec.from_json(raw)


@_redis_op("mark running")
def mark_running(r: redis.Redis, keys: Keys, job_id: str, shard: int, worker: str) -> None:
    r.hset(keys.job(job_id, "running"), str(shard), worker)


@_redis_op("mark done")
def mark_done(r: redis.Redis, keys: Keys, job_id: str, shard: int, ok: int, failed: int) -> bool:
    """Count a committed shard once (hash membership), whatever the number of runs.

    Returns:
        True the first time this shard is marked done (count its images then).
    """
    pipe = r.pipeline()
    pipe.hset(keys.job(job_id, "done"), str(shard), f"{ok},{failed}")
    pipe.hdel(keys.job(job_id, "failed"), str(shard))
    pipe.hdel(keys.job(job_id, "running"), str(shard))
    return bool(pipe.execute()[0])


@_redis_op("mark failed")
def mark_failed(r: redis.Redis, keys: Keys, job_id: str, shard: int, reason: str) -> None:
    """Record a shard that failed permanently, with its reason (bounded to 500 characters)."""
    pipe = r.pipeline()
    pipe.hset(keys.job(job_id, "failed"), str(shard), reason[:500])
    pipe.hdel(keys.job(job_id, "running"), str(shard))
    pipe.execute()


@_redis_op("clear running")
def clear_running(r: redis.Redis, keys: Keys, job_id: str, shard: int) -> None:
    r.hdel(keys.job(job_id, "running"), str(shard))


@_redis_op("read cancel flag")
def is_cancelled(r: redis.Redis, keys: Keys, job_id: str) -> bool:
    return r.get(keys.job(job_id, "state")) == b"cancelled"


@_redis_op("read counts")
def counts(r: redis.Redis, keys: Keys, spec: JobSpec) -> JobCounts:
    """Shard and item counts of ``spec``'s job."""
    jid = spec.job_id
    pipe = r.pipeline()
    pipe.hvals(keys.job(jid, "done"))
    pipe.hlen(keys.job(jid, "failed"))
    pipe.hlen(keys.job(jid, "running"))
    pipe.get(keys.job(jid, "state"))
    done, failed, running, state = pipe.execute()
    ok = sum(int(v.split(b",")[0]) for v in done)
    bad = sum(int(v.split(b",")[1]) for v in done)
    return JobCounts(num_shards=spec.shard_plan().num_shards, shards_done=len(done), shards_failed=failed,
                     shards_running=running, items_ok=ok, items_failed=bad, cancelled=state == b"cancelled")


def finalize_if_complete(r: redis.Redis, keys: Keys, store: ObjectStore, layout: Layout,
                         spec: JobSpec) -> bool:
    """Write ``manifest.parquet`` and ``_SUCCESS`` once every shard is committed or failed.

    Safe to call from every worker after each shard: a Redis lock lets one
    finaliser run at a time and the outputs are rebuilt from committed shard
    indexes, so a second run writes the same manifest. Unfinished multipart
    uploads under the job's ``shards/`` (left by workers killed mid-upload)
    are aborted, so they stop costing storage.

    Returns:
        True when the job is finished and its manifest written.
    """
    c = counts(r, keys, spec)
    if not c.finished or c.cancelled:
        return False
    lock = keys.job(spec.job_id, "finalizing")
    try:
        if not r.set(lock, b"1", nx=True, ex=300):
            return False
    except redis.RedisError as e:
        raise QueueUnavailableError(f"Redis unavailable finalising job {spec.job_id}") from e
    try:
        table = build_manifest(store, layout, write=True)
        abort = getattr(store, "abort_multipart_uploads", None)  # S3 only
        if abort is not None:  # left by runs killed mid-upload; every shard is committed or failed now
            aborted = abort(layout.shards_prefix)
            if aborted:
                log.info("aborted %d unfinished multipart uploads", aborted, extra={"job_id": spec.job_id})
        failures = {k.decode(): v.decode() for k, v in r.hgetall(keys.job(spec.job_id, "failed")).items()}
        started = spec.created_at.timestamp()
        rows = table.select(["status", "reason"]).to_pylist()
        summary = {
            "job_id": spec.job_id, "state": c.state, "num_shards": c.num_shards,
            "shards_done": c.shards_done, "shards_failed": c.shards_failed,
            "items_ok": sum(1 for row in rows if row["status"] == "ok"),
            "items_failed": sum(1 for row in rows if row["status"] != "ok"),
            "items_failed_by_reason": dict(sorted(Counter(str(row["reason"]) for row in rows
                                                          if row["status"] != "ok").items())),
            "failed_shards": failures,
            "seconds": round(time.time() - started, 3),
        }
        summary["images_per_s"] = round(summary["items_ok"] / max(summary["seconds"], 1e-9), 3)
        store.put_bytes(f"{layout.job_prefix}/{SUCCESS_OBJECT}", json.dumps(summary, sort_keys=True).encode(),
                        "application/json")
        r.set(keys.job(spec.job_id, "summary"), json.dumps(summary, sort_keys=True))
        log.info("job finalised", extra={"job_id": spec.job_id, **{k: v for k, v in summary.items()
                                                                  if k != "failed_shards"}})
        return True
    finally:
        r.delete(lock)


def counts_dict(c: JobCounts) -> dict:
    """``JobCounts`` as a JSON-ready dict, with its state."""
    return {**asdict(c), "state": c.state}
