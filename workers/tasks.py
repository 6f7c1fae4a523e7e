"""The one Celery task: ``genimg.generate_shard(job_id, shard_index)``; the shard's lifecycle is
:func:`genimg.lifecycle.process_shard`, and this task maps its outcome to ack, retry or fail.

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
reason, and the rest of the job goes on; so does any other exception of the
shard's run (``internal_error:<type>``: a bug must not lose a shard) and a
stored spec that does not parse (``spec_unusable``).
"""

from __future__ import annotations

import logging
import math
import random
import time

from celery.exceptions import SoftTimeLimitExceeded

from genimg import metrics
from genimg.errors import GenImgError, InferenceUnavailableError, PermanentError, RetryableError, StorageNotFoundError
from genimg.jobs import mark_failed
from genimg.layout import JOB_ID_RE
from genimg.lifecycle import fail_shard, process_shard
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
    ctx = None
    try:
        ctx = context()
        spec = ctx.spec(job_id)
    except StorageNotFoundError as e:  # Redis does not know the job (lost, or removed): nothing to record it in
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
    except Exception as e:  # noqa: BLE001 - a spec that does not parse (edited by hand, or a bug): recorded
        if ctx is None:  # the worker itself cannot work (a setting): the shard goes back for another worker
            log.error("worker cannot start shards: %s: %s", type(e).__name__, e, extra=fields)
            raise self.retry(exc=e, countdown=backoff_s(min(self.request.retries, 10)),
                             kwargs={"retry_since": retry_since}) from None
        log.error("job spec unusable: %s: %s", type(e).__name__, e, extra=fields)
        mark_failed(ctx.redis, ctx.keys, job_id, shard_index, f"spec_unusable: {type(e).__name__}: {e}")
        metrics.SHARDS_FAILED.labels("spec_unusable").inc()
        return {"status": "failed", "reason": "spec_unusable", **fields}
    if shard_index >= spec.shard_plan().num_shards:
        log.error("shard index out of range", extra=fields)
        return {"status": "rejected", "reason": "shard_out_of_range", **fields}
    try:
        return process_shard(ctx.redis, ctx.keys, spec, shard_index, stores=ctx.store_for, infer=ctx.infer,
                             worker=ctx.hostname, infer_inflight=SETTINGS.infer_inflight,
                             encode_threads=max(1, SETTINGS.upload_threads // 2))
    except (RetryableError, SoftTimeLimitExceeded) as e:
        reason = _reason(e)
        now = time.time()
        since = now if since is None else min(since, now)
        spent = now - since
        if spent >= SETTINGS.retry_budget_s:
            budget = f" (retried for {spent:.0f} s, budget GENIMG_RETRY_BUDGET_S={SETTINGS.retry_budget_s:g})"
            return fail_shard(ctx.redis, ctx.keys, spec, shard_index, f"retries_exhausted:{reason}", e,
                              stores=ctx.store_for, detail=budget)
        if isinstance(e, InferenceUnavailableError):
            drop_inference_client()
        metrics.SHARDS_RETRIED.labels(reason).inc()
        countdown = min(backoff_s(min(self.request.retries, 30)), max(0.0, SETTINGS.retry_budget_s - spent) + 0.5)
        log.warning("shard retry %d in %.1f s (retrying for %.0f of %g s): %s", self.request.retries + 1,
                    countdown, spent, SETTINGS.retry_budget_s, e, extra=fields)
        raise self.retry(exc=e, countdown=countdown, kwargs={"retry_since": since}) from None
    except (PermanentError, GenImgError) as e:
        return fail_shard(ctx.redis, ctx.keys, spec, shard_index, _reason(e), e, stores=ctx.store_for)
    except Exception as e:  # noqa: BLE001 - a bug of ours must not lose the shard: recorded, the job goes on
        log.exception("shard hit an unexpected error", extra=fields)
        return fail_shard(ctx.redis, ctx.keys, spec, shard_index, f"internal_error:{type(e).__name__}", e,
                          stores=ctx.store_for)

