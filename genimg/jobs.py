"""The job's state in Redis (every read and write of it) and the job's finalisation.

Redis keys (``{p}`` is the key prefix, ``GENIMG_KEY_PREFIX``, default ``genimg``):

| key | type | meaning |
| --- | --- | --- |
| ``{p}:job:{id}:spec`` | string | the JobSpec JSON (also in storage as ``job.json``) |
| ``{p}:job:{id}:done`` | hash | shard → ``"ok_items,failed_items"`` of each committed shard |
| ``{p}:job:{id}:failed`` | hash | shard → reason, shards that failed permanently |
| ``{p}:job:{id}:running`` | hash | shard → worker hostname, while a worker runs it |
| ``{p}:job:{id}:totals`` | hash | ``items_ok``, ``items_failed``: sums over the done-hash, kept by :func:`mark_done` |
| ``{p}:job:{id}:state`` | string | ``cancelled`` once cancelled (otherwise derived) |
| ``{p}:job:{id}:healed`` | hash | shard → times the reconciler re-enqueued it (``genimg reconcile``) |
| ``{p}:job:{id}:summary`` | string | the ``_SUCCESS`` summary once finalised |
| ``{p}:job:{id}:finalizing`` | string | the finaliser's lock (300 s TTL) |
| ``{p}:job:{id}:part:{n}`` | string | lock of a worker writing manifest part ``n`` (300 s TTL) |
| ``{p}:jobs`` | sorted set | job ids by submit time |
| ``{p}:idem:{key}`` | string | job id of an idempotency key |
| ``{p}:reconciler:lease`` | string | token of the ``genimg reconcile`` replica that acts (expires) |

Completion is counted by hash membership, so a shard committed twice counts once.

Redis errors become :class:`~genimg.errors.QueueUnavailableError` through one
translator (:func:`genimg.queue.redis_errors`). Every write here is idempotent:
a shard committed twice, or a finaliser run twice, leaves the same state.
Reading a job's progress costs O(1) in its number of shards: the done-hash's
item counts are summed into a ``totals`` hash by the same Lua script that adds
the shard to the done-hash, once per shard (:func:`mark_done`), so neither
``status`` nor the check a worker runs after each shard reads the whole done-hash.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ParamSpec, TypeVar

import redis
from redis.typing import EncodableT, FieldT

from genimg import card
from genimg.errors import StorageNotFoundError
from genimg.layout import SUCCESS_OBJECT, Layout
from genimg.manifest import PartPlan, build_part, finalize_parts, job_schema, read_summary
from genimg.publish import publish
from genimg.queue import redis_errors
from genimg.spec import JobSpec
from genimg.stores.base import ObjectStore

log = logging.getLogger(__name__)

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


P = ParamSpec("P")
R = TypeVar("R")


def _redis_op(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: the function's redis-py errors become QueueUnavailableError (:func:`redis_errors`)."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*a: P.args, **kw: P.kwargs) -> R:
            with redis_errors(what):
                return fn(*a, **kw)

        return inner

    return wrap


@dataclass(frozen=True)
class Keys:
    """Redis key names of one key prefix."""

    prefix: str = "genimg"

    def job(self, job_id: str, part: str) -> str:
        """``{p}:job:{id}:{part}`` (``part``: spec, done, failed, running, totals, state, healed, summary, ...)."""
        return self._join("job", job_id, part)

    @property
    def jobs(self) -> str:
        """``{p}:jobs``, the sorted set of job ids by submit time."""
        return self._join("jobs")

    def idem(self, key: str) -> str:
        """``{p}:idem:{key}``, the job id an idempotency key names."""
        return self._join("idem", key)

    @property
    def reconciler_lease(self) -> str:
        """``{p}:reconciler:lease``, held by the ``genimg reconcile`` replica that acts."""
        return self._join("reconciler", "lease")

    def _join(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))


def _done_value(ok: int, failed: int) -> str:
    """A done-hash value: ``"ok_items,failed_items"`` (what :data:`_RECOUNT` parses)."""
    return f"{int(ok)},{int(failed)}"


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


@_redis_op("read spec")
def read_spec_json(r: redis.Redis, keys: Keys, job_id: str) -> bytes | None:
    """The job's stored spec JSON, or ``None`` when Redis does not know the job."""
    raw = r.get(keys.job(job_id, "spec"))
    if raw is None:
        return None
    return raw.encode() if isinstance(raw, str) else bytes(raw)


def load_spec(r: redis.Redis, keys: Keys, job_id: str) -> JobSpec:
    """The job's spec from Redis (a worker's view: a job Redis lost is unknown until resumed).

    Raises:
        StorageNotFoundError: Redis does not know the job.
        QueueUnavailableError: Redis is unreachable.
        ValidationError: the stored spec is invalid (e.g. edited by hand).
    """
    raw = read_spec_json(r, keys, job_id)
    if raw is None:
        raise StorageNotFoundError(f"job {job_id} is unknown")
    return JobSpec.from_json(raw)


@_redis_op("list jobs")
def recent_job_ids(r: redis.Redis, keys: Keys, limit: int) -> list[str]:
    """Ids of the ``limit`` most recently submitted jobs Redis knows, newest first."""
    ids = r.zrevrange(keys.jobs, 0, max(0, limit - 1))
    return [raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw) for raw in ids]


@_redis_op("list jobs")
def all_job_ids(r: redis.Redis, keys: Keys) -> list[str]:
    """Ids of every job Redis knows, oldest first."""
    return [i.decode() if isinstance(i, bytes) else str(i) for i in r.zrange(keys.jobs, 0, -1)]


@dataclass(frozen=True)
class JobFlags:
    """What the reconciler reads of each job first: finalised, cancelled, and its finished-shard counts."""

    finalised: bool
    cancelled: bool
    shards_done: int
    shards_failed: int


@_redis_op("read job flags")
def job_flags(r: redis.Redis, keys: Keys, job_ids: list[str]) -> list[JobFlags]:
    """:class:`JobFlags` of each job, in order (one pipelined round trip)."""
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.exists(keys.job(job_id, "summary"))
        pipe.get(keys.job(job_id, "state"))
        pipe.hlen(keys.job(job_id, "done"))
        pipe.hlen(keys.job(job_id, "failed"))
    answers = pipe.execute()
    return [JobFlags(bool(summary), state == b"cancelled", int(done), int(failed))
            for summary, state, done, failed in (answers[4 * i:4 * i + 4] for i in range(len(job_ids)))]


@_redis_op("read finished shards")
def finished_shards(r: redis.Redis, keys: Keys, job_ids: list[str]) -> dict[str, set[int]]:
    """``{job_id: shards done or failed}`` (O(shards) per job, one pipelined round trip)."""
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hkeys(keys.job(job_id, "done"))
        pipe.hkeys(keys.job(job_id, "failed"))
    answers = pipe.execute()
    return {job_id: {int(s) for s in answers[2 * i]} | {int(s) for s in answers[2 * i + 1]}
            for i, job_id in enumerate(job_ids)}


@_redis_op("read finished shards")
def unfinished(r: redis.Redis, keys: Keys, job_id: str, shards: list[int]) -> list[bool]:
    """For each shard, whether it is neither done nor failed (one pipelined round trip)."""
    pipe = r.pipeline(transaction=False)
    for shard in shards:
        pipe.hexists(keys.job(job_id, "done"), str(shard))
        pipe.hexists(keys.job(job_id, "failed"), str(shard))
    flags = pipe.execute()
    return [not (flags[2 * i] or flags[2 * i + 1]) for i in range(len(shards))]


@_redis_op("count heals")
def count_heals(r: redis.Redis, keys: Keys, job_id: str, shards: list[int]) -> list[int]:
    """Add one to each shard's reconciler re-enqueue count; returns the new counts."""
    pipe = r.pipeline(transaction=False)
    for shard in shards:
        pipe.hincrby(keys.job(job_id, "healed"), str(shard), 1)
    return [int(n) for n in pipe.execute()]


@_redis_op("clear running")
def clear_running(r: redis.Redis, keys: Keys, job_id: str, shards: list[int]) -> None:
    """Forget the running records of shards about to be re-enqueued."""
    r.hdel(keys.job(job_id, "running"), *[str(s) for s in shards])


@_redis_op("claim idempotency key")
def claim_idempotency_key(r: redis.Redis, keys: Keys, key: str, job_id: str, ttl_s: int) -> bool:
    """Claim ``key`` for ``job_id`` for ``ttl_s`` seconds (``SET NX EX``); False when it is claimed already."""
    return bool(r.set(keys.idem(key), job_id.encode(), nx=True, ex=ttl_s))


@_redis_op("keep idempotency key")
def keep_idempotency_key(r: redis.Redis, keys: Keys, key: str) -> None:
    """Keep a claimed key for ever (its job is stored)."""
    r.persist(keys.idem(key))


@_redis_op("release idempotency key")
def release_idempotency_key(r: redis.Redis, keys: Keys, key: str) -> None:
    r.delete(keys.idem(key))


@_redis_op("forget job")
def forget_job(r: redis.Redis, keys: Keys, job_id: str, idempotency_key: str | None) -> None:
    """Undo :func:`store_spec` (and an idempotency claim) of a submit that failed."""
    pipe = r.pipeline()
    pipe.delete(keys.job(job_id, "spec"))
    pipe.zrem(keys.jobs, job_id)
    if idempotency_key is not None:
        pipe.delete(keys.idem(idempotency_key))
    pipe.execute()


@_redis_op("read summary")
def stored_summary(r: redis.Redis, keys: Keys, job_id: str) -> dict[str, Any] | None:
    """The job's ``_SUCCESS`` summary as Redis keeps it, or ``None`` before finalisation."""
    raw = r.get(keys.job(job_id, "summary"))
    return json.loads(raw) if raw else None


@_redis_op("cancel")
def cancel(r: redis.Redis, keys: Keys, job_id: str) -> None:
    """Set the job's ``cancelled`` state: workers skip its shards from now on."""
    r.set(keys.job(job_id, "state"), b"cancelled")


@_redis_op("read done")
def done_shards(r: redis.Redis, keys: Keys, job_id: str) -> set[int]:
    """Shards in the job's done-hash (O(shards))."""
    return {int(s) for s in r.hkeys(keys.job(job_id, "done"))}


@_redis_op("restore done")
def restore_done(r: redis.Redis, keys: Keys, job_id: str, item_counts: Mapping[int, tuple[int, int]]) -> None:
    """Put committed shards back into the done-hash with their ``(ok, failed)`` item counts (then
    :func:`recount_totals`)."""
    shards = sorted(item_counts)
    for i in range(0, len(shards), 10_000):
        part: dict[FieldT, EncodableT] = {str(s): _done_value(*item_counts[s]) for s in shards[i:i + 10_000]}
        r.hset(keys.job(job_id, "done"), mapping=part)


@_redis_op("reset job state")
def reset_for_resume(r: redis.Redis, keys: Keys, job_id: str, todo: Iterable[int]) -> None:
    """Clear a resumed job's ``cancelled`` state and, for the shards ``todo`` (no committed index), their done,
    failed, running and reconciler records, and the stale summary (when any shard is left to do)."""
    todo = list(todo)
    pipe = r.pipeline()
    pipe.delete(keys.job(job_id, "state"))
    if todo:
        pipe.delete(keys.job(job_id, "summary"))
        for i in range(0, len(todo), 10_000):
            part = [str(s) for s in todo[i:i + 10_000]]
            pipe.hdel(keys.job(job_id, "failed"), *part)
            pipe.hdel(keys.job(job_id, "running"), *part)
            pipe.hdel(keys.job(job_id, "done"), *part)  # its index is gone: not done
            pipe.hdel(keys.job(job_id, "healed"), *part)  # the reconciler's count starts afresh
    pipe.execute()


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
                 k(job_id, "totals"), str(shard), _done_value(ok, failed), int(ok), int(failed))
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
    with redis_errors(f"compacting job {spec.job_id}"):
        done = r.hmget(keys.job(spec.job_id, "done"), [str(s) for s in range(start, stop)])
        if any(v is None for v in done) or not r.set(lock, b"1", nx=True, ex=300):
            return False
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
        with redis_errors(f"finalising job {spec.job_id}"):
            if not r.set(lock, b"1", nx=True, ex=300):
                return finished
        try:
            _finalize(r, keys, store, layout, spec, c)
            finished = True
        finally:
            with redis_errors(f"finalising job {spec.job_id}"):
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
    with redis_errors(f"finalising job {spec.job_id}"):
        for k, v in r.hscan_iter(keys.job(spec.job_id, "failed"), count=1000):
            failures[k.decode()] = v.decode()
            if len(failures) >= FAILED_SHARDS_LISTED:
                break
    seconds = round(time.time() - spec.created_at.timestamp(), 3)
    summary: dict[str, Any] = {
        "job_id": spec.job_id, "state": c.state, "num_shards": c.num_shards,
        "shards_done": c.shards_done, "shards_failed": c.shards_failed,
        "items_ok": totals.items_ok, "items_failed": totals.items_failed,
        "items_failed_by_reason": totals.items_failed_by_reason,
        "failed_shards": dict(sorted(failures.items(), key=lambda kv: int(kv[0]))),
        "manifest": {"prefix": layout.manifest_prefix.removeprefix(f"{layout.job_prefix}/"),
                     "parts": totals.parts, "rows": totals.rows, "bytes": totals.bytes},
        "seconds": seconds,
    }
    summary["images_per_s"] = round(totals.items_ok / max(seconds, 1e-9), 3)
    report, manifest_bytes = publish(store, layout, spec, summary,
                                     lock=lambda p: _part_lock(r, keys, spec.job_id, p))
    summary["manifest"]["bytes"] = manifest_bytes if manifest_bytes is not None else totals.bytes
    summary["dedup"] = {k: v for k, v in report.to_dict().items() if not k.endswith("_examples")}
    summary["card"] = card.CARD_OBJECT
    store.put_bytes(f"{layout.job_prefix}/{SUCCESS_OBJECT}", json.dumps(summary, sort_keys=True).encode(),
                    "application/json")
    with redis_errors(f"finalising job {spec.job_id}"):
        r.set(keys.job(spec.job_id, "summary"), json.dumps(summary, sort_keys=True))
    log.info("job finalised", extra={"job_id": spec.job_id, **{k: v for k, v in summary.items()
                                                              if k not in ("failed_shards", "manifest")}})


@contextmanager
def _part_lock(r: redis.Redis, keys: Keys, job_id: str, part: int) -> Iterator[None]:
    """Hold the lock a worker takes to compact ``part`` (waits at most :data:`PART_LOCK_WAIT_S`).

    Raises:
        QueueUnavailableError: Redis is unreachable while taking the lock.
    """
    lock = keys.job(job_id, f"part:{part}")
    deadline = time.monotonic() + PART_LOCK_WAIT_S
    with redis_errors(f"locking part {part} of job {job_id}"):
        while not r.set(lock, b"1", nx=True, ex=300):
            if time.monotonic() > deadline:  # its holder died: the lock expires, nobody else writes the part
                log.warning("part %d still locked; marking it anyway", part, extra={"job_id": job_id})
                break
            time.sleep(0.05)
    try:
        yield
    finally:
        try:
            r.delete(lock)
        except redis.RedisError:
            pass  # it expires


def counts_dict(c: JobCounts) -> dict:
    """``JobCounts`` as a JSON-ready dict, with its state."""
    return {**asdict(c), "state": c.state}
