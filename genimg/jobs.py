"""Job bookkeeping in Redis (see :mod:`genimg.queue` for the key layout) and job finalisation.

Every write here is idempotent: a shard committed twice, or a finaliser run
twice, leaves the same state. Reading a job's progress costs O(1) in its
number of shards: the done-hash's item counts are summed into a ``totals``
hash by the same Lua script that adds the shard to the done-hash, once per
shard (:func:`mark_done`), so neither ``status`` nor the check a worker runs
after each shard reads the whole done-hash.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import redis

from genimg.errors import QueueUnavailableError, StorageNotFoundError
from genimg import card, dedup
from genimg.manifest import (
    PartPlan,
    build_part,
    finalize_parts,
    iter_parts,
    job_schema,
    read_part,
    read_summary,
    write_part,
)
from genimg.queue import Keys, describe_redis_error
from genimg.shards import Layout
from genimg.spec import JobSpec
from genimg.storage import ObjectStore

log = logging.getLogger(__name__)

SPEC_OBJECT = "job.json"
SUCCESS_OBJECT = "_SUCCESS"
FAILED_SHARDS_LISTED = 1_000
"""Most failed shards (with reasons) ``_SUCCESS`` lists; ``shards_failed`` counts them all."""
FINALIZE_ROUNDS = 5
"""Most rounds of one finaliser when shards change state while it writes."""
PART_LOCK_WAIT_S = 120.0
"""Longest the finaliser waits for a worker compacting a part before it marks duplicates in that part."""

_MARK_DONE = """
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if new == 1 then
  redis.call('HINCRBY', KEYS[4], 'items_ok', ARGV[3])
  redis.call('HINCRBY', KEYS[4], 'items_failed', ARGV[4])
end
return new
"""
"""Add a shard to the done-hash and, the first time only, its item counts to the totals (atomically)."""

_RECOUNT = """
local ok, bad = 0, 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local sep = string.find(v, ',', 1, true)
  ok = ok + tonumber(string.sub(v, 1, sep - 1))
  bad = bad + tonumber(string.sub(v, sep + 1))
end
redis.call('HSET', KEYS[2], 'items_ok', ok, 'items_failed', bad)
return {ok, bad}
"""
"""Recompute the totals from the done-hash (after resume rewrote it, or for a job from before the totals)."""


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
    k = keys.job
    new = r.eval(_MARK_DONE, 4, k(job_id, "done"), k(job_id, "failed"), k(job_id, "running"),
                 k(job_id, "totals"), str(shard), f"{ok},{failed}", int(ok), int(failed))
    return bool(new)


@_redis_op("recount totals")
def recount_totals(r: redis.Redis, keys: Keys, job_id: str) -> tuple[int, int]:
    """Recompute the job's item totals from its done-hash, atomically (O(shards), once).

    Returns:
        ``(items_ok, items_failed)``.
    """
    ok, bad = r.eval(_RECOUNT, 2, keys.job(job_id, "done"), keys.job(job_id, "totals"))
    return int(ok), int(bad)


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
    """Shard and item counts of ``spec``'s job (O(1) in its number of shards)."""
    jid = spec.job_id
    pipe = r.pipeline(transaction=False)
    pipe.hlen(keys.job(jid, "done"))
    pipe.hlen(keys.job(jid, "failed"))
    pipe.hlen(keys.job(jid, "running"))
    pipe.get(keys.job(jid, "state"))
    pipe.hmget(keys.job(jid, "totals"), "items_ok", "items_failed")
    done, failed, running, state, (ok, bad) = pipe.execute()
    if ok is None and done:  # a job whose done-hash predates the totals
        ok, bad = recount_totals(r, keys, jid)
    return JobCounts(num_shards=spec.shard_plan().num_shards, shards_done=int(done), shards_failed=int(failed),
                     shards_running=int(running), items_ok=int(ok or 0), items_failed=int(bad or 0),
                     cancelled=state == b"cancelled")


def compact_part_if_complete(r: redis.Redis, keys: Keys, store: ObjectStore, layout: Layout, spec: JobSpec,
                             shard: int) -> bool:
    """Write the manifest part that holds ``shard`` if every shard of its range is committed.

    Called by a worker after it marks a shard done: one ``HMGET`` of the
    range's shards; the worker that completes a range builds its part (a
    Redis lock keeps others from building the same part at once), unless a
    final summary of it exists already.

    Returns:
        True when this call wrote the part.

    Raises:
        QueueUnavailableError: Redis is unreachable.
        StorageUnavailableError: a retryable storage fault.
        StorageError: an unreadable index, or another storage fault.
    """
    plan = PartPlan.for_spec(spec)
    part = plan.part_of_shard(shard)
    start, stop = plan.part_range(part)
    lock = keys.job(spec.job_id, f"part:{part}")
    try:
        done = r.hmget(keys.job(spec.job_id, "done"), [str(s) for s in range(start, stop)])
        if any(v is None for v in done) or not r.set(lock, b"1", nx=True, ex=300):
            return False
    except redis.RedisError as e:
        raise QueueUnavailableError(f"Redis unavailable compacting job {spec.job_id}: "
                                    f"{describe_redis_error(e)}") from e
    try:
        summary = read_summary(store, layout, part)
        if summary is not None and summary.final and summary.shards == (start, stop):
            return False
        build_part(store, layout, plan, part, schema=job_schema(spec))
        return True
    finally:
        try:
            r.delete(lock)
        except redis.RedisError:
            pass  # it expires


def finalize_if_complete(r: redis.Redis, keys: Keys, store: ObjectStore, layout: Layout,
                         spec: JobSpec) -> bool:
    """Write the manifest's missing parts and ``_SUCCESS`` once every shard is committed or failed.

    Safe to call from every worker after each shard: a Redis lock lets one
    finaliser run at a time; parts that workers compacted are kept, the
    others (:func:`genimg.manifest.finalize_parts`) are rebuilt from committed
    shard indexes, so a second run writes the same manifest. If a shard
    changes state while the finaliser runs (a late commit of a failed shard),
    it goes round again once it has released the lock, so a caller that found
    the lock taken is never left with a stale manifest. Unfinished multipart
    uploads under the job's ``shards/`` (left by workers killed mid-upload)
    are aborted, so they stop costing storage.

    Returns:
        True when the job is finished and its manifest written.
    """
    finished = False
    for _ in range(FINALIZE_ROUNDS):
        c = counts(r, keys, spec)
        if not c.finished or c.cancelled:
            return finished
        lock = keys.job(spec.job_id, "finalizing")
        try:
            if not r.set(lock, b"1", nx=True, ex=300):
                return finished
        except redis.RedisError as e:
            raise QueueUnavailableError(f"Redis unavailable finalising job {spec.job_id}") from e
        try:
            _finalize(r, keys, store, layout, spec, c)
            finished = True
        finally:
            r.delete(lock)
        after = counts(r, keys, spec)
        if (after.shards_done, after.shards_failed) == (c.shards_done, c.shards_failed):
            return True
        log.info("shards changed while finalising; going round again", extra={"job_id": spec.job_id})
    return finished


def _finalize(r: redis.Redis, keys: Keys, store: ObjectStore, layout: Layout, spec: JobSpec,
              c: JobCounts) -> None:
    totals = finalize_parts(store, layout, PartPlan.for_spec(spec), schema=job_schema(spec))
    abort = getattr(store, "abort_multipart_uploads", None)  # S3 only
    if abort is not None:  # left by runs killed mid-upload; every shard is committed or failed now
        aborted = abort(layout.shards_prefix)
        if aborted:
            log.info("aborted %d unfinished multipart uploads", aborted, extra={"job_id": spec.job_id})
    failures: dict[str, str] = {}
    for k, v in r.hscan_iter(keys.job(spec.job_id, "failed"), count=1000):
        failures[k.decode()] = v.decode()
        if len(failures) >= FAILED_SHARDS_LISTED:
            break
    started = spec.created_at.timestamp()
    summary = {
        "job_id": spec.job_id, "state": c.state, "num_shards": c.num_shards,
        "shards_done": c.shards_done, "shards_failed": c.shards_failed,
        "items_ok": totals.items_ok, "items_failed": totals.items_failed,
        "items_failed_by_reason": totals.items_failed_by_reason,
        "failed_shards": dict(sorted(failures.items(), key=lambda kv: int(kv[0]))),
        "manifest": {"prefix": layout.manifest_prefix.removeprefix(f"{layout.job_prefix}/"),
                     "parts": totals.parts, "rows": totals.rows, "bytes": totals.bytes},
        "seconds": round(time.time() - started, 3),
    }
    summary["images_per_s"] = round(summary["items_ok"] / max(summary["seconds"], 1e-9), 3)
    report, manifest_bytes = _publish(r, keys, store, layout, spec, summary)
    summary["manifest"]["bytes"] = manifest_bytes if manifest_bytes is not None else totals.bytes
    summary["dedup"] = {k: v for k, v in report.to_dict().items() if not k.endswith("_examples")}
    summary["card"] = card.CARD_OBJECT
    store.put_bytes(f"{layout.job_prefix}/{SUCCESS_OBJECT}", json.dumps(summary, sort_keys=True).encode(),
                    "application/json")
    r.set(keys.job(spec.job_id, "summary"), json.dumps(summary, sort_keys=True))
    log.info("job finalised", extra={"job_id": spec.job_id, **{k: v for k, v in summary.items()
                                                              if k not in ("failed_shards", "manifest")}})


@contextmanager
def _part_lock(r: redis.Redis, keys: Keys, job_id: str, part: int) -> Iterator[None]:
    """Hold the lock a worker takes to compact ``part`` (waits at most :data:`PART_LOCK_WAIT_S`)."""
    lock = keys.job(job_id, f"part:{part}")
    deadline = time.monotonic() + PART_LOCK_WAIT_S
    try:
        while not r.set(lock, b"1", nx=True, ex=300):
            if time.monotonic() > deadline:  # its holder died: the lock expires, nobody else writes the part
                log.warning("part %d still locked; marking it anyway", part, extra={"job_id": job_id})
                break
            time.sleep(0.05)
        yield
    except redis.RedisError as e:
        raise QueueUnavailableError(f"Redis unavailable locking a part of job {job_id}") from e
    finally:
        try:
            r.delete(lock)
        except redis.RedisError:
            pass  # it expires


def _publish(r: redis.Redis, keys: Keys, store: ObjectStore, layout: Layout, spec: JobSpec,
             summary: dict) -> tuple[dedup.DedupReport, int | None]:
    """What a finished job publishes beside its manifest, before ``_SUCCESS``: duplicates and the card.

    One pass over the manifest's parts collects the dedup columns and what the card
    needs; with ``spec.dedup`` the parts whose ``duplicate_of`` changes are rewritten
    (:func:`genimg.dedup.mark_parts`); then ``dedup.json``, ``contact_sheet.png`` and
    ``README.md`` are written (:mod:`genimg.card`). Idempotent.

    Returns:
        The duplicates report, and the manifest's bytes when parts were rewritten (else ``None``).
    """
    started = time.perf_counter()
    plan, schema = PartPlan.for_spec(spec), job_schema(spec)
    facts, scan = card.CardFacts(), dedup.Scan()
    items = int(summary["items_ok"]) + int(summary["items_failed"])
    scan_all = spec.dedup is not None or items <= dedup.REPORT_MAX_ITEMS
    for table in iter_parts(store, layout, plan, schema=schema):
        facts.add(table)
        if scan_all:
            scan.add(table)
        elif facts.sheet_full:  # a bulk job that did not ask: its finalisation stays O(parts' summaries)
            break
    if not scan_all:
        report = dedup.DedupReport.not_scanned_because(f"{items:,} items > {dedup.REPORT_MAX_ITEMS:,}: submit the job "
                                               "with dedup='exact' or 'near' to scan it")
        store.put_bytes(f"{layout.job_prefix}/{dedup.DEDUP_OBJECT}",
                        json.dumps(report.to_dict(), sort_keys=True, indent=1).encode(), "application/json")
        card.write_card(store, layout, spec, summary, facts, report)
        log.info("published job=%s (duplicates not scanned) publish_s=%.3f", spec.job_id,
                 time.perf_counter() - started)
        return report, None
    found = scan.find(dedup.NEAR_DISTANCE)
    manifest_bytes = None
    if spec.dedup is not None:
        def rewrite(part: int, table) -> None:
            old = read_summary(store, layout, part)
            write_part(store, layout, plan, part, table, old.shards_missing if old else ())

        rewritten = dedup.mark_parts(range(plan.num_parts), found, spec.dedup,
                                     read=lambda p: read_part(store, layout, p, schema), write=rewrite,
                                     lock=lambda p: _part_lock(r, keys, spec.job_id, p))
        if rewritten:
            parts = [read_summary(store, layout, p) for p in range(plan.num_parts)]
            manifest_bytes = sum(s.bytes for s in parts if s is not None)
    report = found.report(spec.dedup)
    store.put_bytes(f"{layout.job_prefix}/{dedup.DEDUP_OBJECT}",
                    json.dumps(report.to_dict(), sort_keys=True, indent=1).encode(), "application/json")
    card.write_card(store, layout, spec, summary, facts, report)
    log.info("published job=%s exact_duplicates=%d near_duplicates=%d dedup_s=%.3f publish_s=%.3f", spec.job_id,
             report.exact_duplicates, report.near_duplicates, report.seconds, time.perf_counter() - started)
    return report, manifest_bytes


def counts_dict(c: JobCounts) -> dict:
    """``JobCounts`` as a JSON-ready dict, with its state."""
    return {**asdict(c), "state": c.state}
