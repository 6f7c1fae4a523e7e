"""The one Celery task: ``genimg.generate_shard(job_id, shard_index)``.

Errors are decided on genimg's own types: a :class:`~genimg.errors.RetryableError`
(Triton or S3 unavailable, a timeout, Redis down) retries the shard with
exponential backoff and equal jitter (each countdown drawn from the upper half of
its exponential step), each countdown at most
``retry_backoff_max_s`` (below the visibility timeout, case C1), for as long
as ``retry_budget_s`` seconds from the shard's first retryable fault (carried
in the retried message as ``retry_since``, Unix seconds); after that the shard
is recorded failed (``retries_exhausted:…``). A budget in time, not a count,
outlasts a Triton restart however many quick attempts it takes. A
:class:`~genimg.errors.PermanentError` records the shard as failed with its
reason, and the rest of the job goes on.
"""

from __future__ import annotations

import logging
import math
import random
import time

from celery.exceptions import SoftTimeLimitExceeded

from genimg import jobs, metrics
from genimg.errors import GenImgError, InferenceUnavailableError, PermanentError, RetryableError
from genimg.layout import JOB_ID_RE
from genimg.pipeline import count_committed, result_from_index, run_shard
from genimg.shards import is_committed, read_shard_index
from workers.app import SETTINGS, app, context, drop_inference_client

log = logging.getLogger(__name__)


def backoff_s(retries: int) -> float:
    """Countdown before retry ``retries`` + 1: equal jitter, uniform in ``[cap / 2, cap]`` where
    ``cap = min(retry_backoff_max_s, base * 2**retries)``."""
    cap = min(float(SETTINGS.retry_backoff_max_s), SETTINGS.retry_backoff_base_s * 2 ** retries)
    return random.uniform(0.5 * cap, cap)


def _reason(e: BaseException) -> str:
    return getattr(e, "reason", None) or type(e).__name__


def _since(value: object) -> float | None:
    """``retry_since`` from a message: finite Unix seconds, else ``None`` (a first run, or a bad value)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@app.task(name="genimg.generate_shard", bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=None)
def generate_shard(self, job_id, shard_index, retry_since=None):
    """Make and commit one shard. Returns ``{"status", "job_id", "shard", "ok", "failed"}`` (JSON).

    ``retry_since`` (Unix seconds) is set by the task itself on retries: when the
    shard met its first retryable fault; its retry budget counts from there.
    """
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id) or type(shard_index) is not int \
            or shard_index < 0:
        log.error("rejected malformed task arguments", extra={"task_id": self.request.id})
        return {"status": "rejected", "reason": "malformed_arguments"}
    fields = {"job_id": job_id, "shard": shard_index}
    since = _since(retry_since)
    try:
        ctx = context()
        spec = ctx.spec(job_id)
    except PermanentError as e:
        log.error("job spec unusable: %s", e, extra=fields)
        return {"status": "rejected", "reason": _reason(e), **fields}
    except (RetryableError, SoftTimeLimitExceeded) as e:
        # Triton or Redis unreachable before the shard could start: this worker's trouble, not the
        # shard's, so no budget is spent. Retry: an exception escaping here would be acknowledged as a
        # task failure and the shard lost.
        if isinstance(e, InferenceUnavailableError):
            drop_inference_client()
        countdown = backoff_s(min(self.request.retries, 10))
        log.warning("shard start retry %d in %.1f s: %s", self.request.retries + 1, countdown, e, extra=fields)
        raise self.retry(exc=e, countdown=countdown, kwargs={"retry_since": retry_since}) from None
    if shard_index >= spec.shard_plan().num_shards:
        log.error("shard index out of range", extra=fields)
        return {"status": "rejected", "reason": "shard_out_of_range", **fields}
    try:
        if jobs.is_cancelled(ctx.redis, ctx.keys, job_id):
            return {"status": "cancelled", **fields}
        store, layout = ctx.store_for(spec)
        if is_committed(store, layout, shard_index):
            done = result_from_index(spec, shard_index, read_shard_index(store, layout, shard_index))
            if jobs.mark_done(ctx.redis, ctx.keys, job_id, shard_index, done.items_ok, done.items_failed):
                count_committed(done, spec.image_format)  # its run died between commit and count
            _compact(ctx, store, layout, spec, shard_index)
            jobs.finalize_if_complete(ctx.redis, ctx.keys, store, layout, spec)
            return {"status": "already_committed", **fields}
        jobs.mark_running(ctx.redis, ctx.keys, job_id, shard_index, ctx.hostname)
        metrics.SHARDS_IN_FLIGHT.inc()
        try:
            result = run_shard(spec, shard_index, store=store, layout=layout, infer=ctx.infer,
                               infer_inflight=SETTINGS.infer_inflight,
                               encode_threads=max(1, SETTINGS.upload_threads // 2))
        finally:
            metrics.SHARDS_IN_FLIGHT.dec()
        if jobs.mark_done(ctx.redis, ctx.keys, job_id, shard_index, result.items_ok, result.items_failed):
            count_committed(result, spec.image_format)
        log.info("shard committed ok=%d failed=%d seconds=%.2f", result.items_ok, result.items_failed,
                 result.seconds["shard"], extra=fields)
        _compact(ctx, store, layout, spec, shard_index)
        jobs.finalize_if_complete(ctx.redis, ctx.keys, store, layout, spec)
        return {"status": "committed", "ok": result.items_ok, "failed": result.items_failed, **fields}
    except (RetryableError, SoftTimeLimitExceeded) as e:
        reason = _reason(e)
        now = time.time()
        since = now if since is None else min(since, now)
        spent = now - since
        if spent >= SETTINGS.retry_budget_s:
            budget = f" (retried for {spent:.0f} s, budget GENIMG_RETRY_BUDGET_S={SETTINGS.retry_budget_s:g})"
            return _fail(ctx, spec, shard_index, f"retries_exhausted:{reason}", e, detail=budget)
        if isinstance(e, InferenceUnavailableError):
            drop_inference_client()
        metrics.SHARDS_RETRIED.labels(reason).inc()
        countdown = min(backoff_s(min(self.request.retries, 30)), max(0.0, SETTINGS.retry_budget_s - spent) + 0.5)
        log.warning("shard retry %d in %.1f s (retrying for %.0f of %g s): %s", self.request.retries + 1,
                    countdown, spent, SETTINGS.retry_budget_s, e, extra=fields)
        raise self.retry(exc=e, countdown=countdown, kwargs={"retry_since": since}) from None
    except (PermanentError, GenImgError) as e:
        return _fail(ctx, spec, shard_index, _reason(e), e)


def _compact(ctx, store, layout, spec, shard_index: int) -> None:
    """Write the manifest part of a range this shard completed; the finaliser writes it if this fails."""
    try:
        jobs.compact_part_if_complete(ctx.redis, ctx.keys, store, layout, spec, shard_index)
    except GenImgError as e:
        log.warning("manifest part not compacted (the finaliser will write it): %s", e,
                    extra={"job_id": spec.job_id, "shard": shard_index})


def _fail(ctx, spec, shard_index: int, reason: str, e: BaseException, detail: str = "") -> dict:
    """Record a shard as failed (reason kept), count it, and let the job finish without it.

    A shard whose index exists was committed by another run (a redelivered
    duplicate, or a run whose upload the finaliser aborted): its commit marker
    wins and this run's failure is not recorded.
    """
    try:
        store, layout = ctx.store_for(spec)
        if is_committed(store, layout, shard_index):
            log.warning("shard run failed after another run committed it (%s); keeping the commit", reason,
                        extra={"job_id": spec.job_id, "shard": shard_index})
            return {"status": "already_committed", "job_id": spec.job_id, "shard": shard_index}
    except GenImgError:
        pass  # storage unreachable: record the failure; resume re-runs the shard
    log.error("shard failed: %s: %s%s", reason, e, detail, extra={"job_id": spec.job_id, "shard": shard_index})
    metrics.SHARDS_FAILED.labels(reason.split(":")[0]).inc()
    jobs.mark_failed(ctx.redis, ctx.keys, spec.job_id, shard_index, f"{reason}: {e}{detail}")
    try:
        store, layout = ctx.store_for(spec)
        jobs.finalize_if_complete(ctx.redis, ctx.keys, store, layout, spec)
    except GenImgError as fe:
        log.warning("finalise after failure deferred: %s", fe, extra={"job_id": spec.job_id})
    return {"status": "failed", "reason": reason, "job_id": spec.job_id, "shard": shard_index}
