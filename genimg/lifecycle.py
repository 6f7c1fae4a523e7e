"""A shard's whole lifecycle: skip if cancelled or committed → run → commit → count done → compact its manifest
part → finalise the job (:func:`process_shard`), or record it failed and finalise without it (:func:`fail_shard`).

Followed as data, a shard index goes down the floors once: this module calls
:mod:`genimg.pipeline` (make and commit the shard), then :mod:`genimg.jobs`
(count it, compact, finalise). The Celery task (:mod:`workers.tasks`) only
maps the outcome to ack (the returned dict is the task's result), retry (a
:class:`~genimg.errors.RetryableError` escapes) or fail (:func:`fail_shard`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis

from genimg import jobs, metrics
from genimg.errors import GenImgError
from genimg.jobs import Keys
from genimg.layout import Layout
from genimg.pipeline import Infer, count_committed, result_from_index, run_shard
from genimg.shards import is_committed, read_shard_index
from genimg.spec import JobSpec
from genimg.stores import ManagedStore

log = logging.getLogger(__name__)

StoreFor = Callable[[JobSpec], tuple[ManagedStore, Layout]]
"""``spec → (store, layout)`` of the job's output (a worker process's store cache)."""


def process_shard(r: redis.Redis, keys: Keys, spec: JobSpec, shard_index: int, *, stores: StoreFor, infer: Infer,
                  worker: str, infer_inflight: int = 2, encode_threads: int = 2) -> dict[str, Any]:
    """Run one shard of ``spec`` unless the job is cancelled or the shard committed, then count and finalise.

    Returns:
        The task's result: ``{"status": "cancelled" | "already_committed" | "committed", "job_id", "shard"}``,
        with ``"ok"`` and ``"failed"`` item counts when this run committed it.

    Raises:
        RetryableError subclasses (Triton, storage or Redis unavailable): retry the shard.
        PermanentError subclasses: the shard cannot succeed (record it with :func:`fail_shard`).
    """
    job_id = spec.job_id
    fields = {"job_id": job_id, "shard": shard_index}
    if jobs.is_cancelled(r, keys, job_id):
        return {"status": "cancelled", **fields}
    store, layout = stores(spec)
    if is_committed(store, layout, shard_index):
        done = result_from_index(spec, shard_index, read_shard_index(store, layout, shard_index))
        if jobs.mark_done(r, keys, job_id, shard_index, done.items_ok, done.items_failed):
            count_committed(done, spec.image_format)  # its run died between commit and count
        _compact(r, keys, store, layout, spec, shard_index)
        jobs.finalize_if_complete(r, keys, store, layout, spec)
        return {"status": "already_committed", **fields}
    jobs.mark_running(r, keys, job_id, shard_index, worker)
    metrics.SHARDS_IN_FLIGHT.inc()
    try:
        result = run_shard(spec, shard_index, store=store, layout=layout, infer=infer,
                           infer_inflight=infer_inflight, encode_threads=encode_threads)
    finally:
        metrics.SHARDS_IN_FLIGHT.dec()
    if jobs.mark_done(r, keys, job_id, shard_index, result.items_ok, result.items_failed):
        count_committed(result, spec.image_format)
    log.info("shard committed ok=%d failed=%d seconds=%.2f", result.items_ok, result.items_failed,
             result.seconds["shard"], extra=fields)
    _compact(r, keys, store, layout, spec, shard_index)
    jobs.finalize_if_complete(r, keys, store, layout, spec)
    return {"status": "committed", "ok": result.items_ok, "failed": result.items_failed, **fields}


def _compact(r: redis.Redis, keys: Keys, store: ManagedStore, layout: Layout, spec: JobSpec,
             shard_index: int) -> None:
    """Write the manifest part of a range this shard completed; the finaliser writes it if this fails."""
    try:
        jobs.compact_part_if_complete(r, keys, store, layout, spec, shard_index)
    except GenImgError as e:
        log.warning("manifest part not compacted (the finaliser will write it): %s", e,
                    extra={"job_id": spec.job_id, "shard": shard_index})


def fail_shard(r: redis.Redis, keys: Keys, spec: JobSpec, shard_index: int, reason: str, e: BaseException, *,
               stores: StoreFor, detail: str = "") -> dict[str, Any]:
    """Record a shard as failed (reason kept), count it, and let the job finish without it.

    A shard whose index exists was committed by another run (a redelivered
    duplicate, or a run whose upload the finaliser aborted): its commit marker
    wins and this run's failure is not recorded.

    Returns:
        The task's result: ``{"status": "failed", "reason", "job_id", "shard"}`` (or ``already_committed``).

    Raises:
        QueueUnavailableError: Redis is unreachable while recording the failure.
    """
    try:
        store, layout = stores(spec)
        if is_committed(store, layout, shard_index):
            log.warning("shard run failed after another run committed it (%s); keeping the commit", reason,
                        extra={"job_id": spec.job_id, "shard": shard_index})
            return {"status": "already_committed", "job_id": spec.job_id, "shard": shard_index}
    except GenImgError:
        pass  # storage unreachable: record the failure; resume re-runs the shard
    log.error("shard failed: %s: %s%s", reason, e, detail, extra={"job_id": spec.job_id, "shard": shard_index})
    metrics.SHARDS_FAILED.labels(reason.split(":")[0]).inc()
    jobs.mark_failed(r, keys, spec.job_id, shard_index, f"{reason}: {e}{detail}")
    try:
        store, layout = stores(spec)
        jobs.finalize_if_complete(r, keys, store, layout, spec)
    except GenImgError as fe:
        log.warning("finalise after failure deferred: %s", fe, extra={"job_id": spec.job_id})
    return {"status": "failed", "reason": reason, "job_id": spec.job_id, "shard": shard_index}
