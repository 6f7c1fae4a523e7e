"""genimg's Prometheus metrics (prefix ``genimg_``), correct under Celery prefork.

Workers run prometheus_client in multiprocess mode: every process writes its
samples to ``PROMETHEUS_MULTIPROC_DIR``; one HTTP endpoint per worker (pod)
aggregates them. :func:`prepare_multiproc_dir` wipes the directory at start
(stale files of a dead run would be added in) and switches prometheus_client to
file-backed values even if it was imported first; :func:`mark_process_dead`
removes a recycled child's live-gauge files, and the endpoint
(:mod:`genimg.metrics_server`) folds dead processes' counts into one archive
file per type so scrapes stay fast (case C4). ``docs/metrics.md`` documents
every metric, with the PromQL that the dashboard and rules use.

| metric | type | labels | unit |
| --- | --- | --- | --- |
| ``genimg_images_written_total`` | counter | model, format | images |
| ``genimg_bytes_written_total`` | counter | model | bytes (encoded images) |
| ``genimg_items_failed_total`` | counter | reason | items |
| ``genimg_shards_committed_total`` | counter | — | shards |
| ``genimg_shards_retried_total`` | counter | reason | shard retries scheduled |
| ``genimg_shards_failed_total`` | counter | reason | shards failed permanently |
| ``genimg_stage_seconds`` | histogram | stage (infer, encode, upload, shard, expand) | seconds |
| ``genimg_expand_tokens`` | histogram | expander | tokens written per expansion (prompt expansion) |
| ``genimg_expand_seconds`` | histogram | expander | seconds per expansion |
| ``genimg_regenerations_total`` | counter | model | extra seeds tried for items that failed ``keep_if`` |
| ``genimg_shards_in_flight`` | gauge (livesum) | — | shards |
| ``genimg_s3_throttled_total`` | counter | operation, code | S3 responses that throttled (every attempt) |
| ``genimg_s3_retries_total`` | counter | operation, code | failed S3 attempts botocore retried |
| ``genimg_backlog_shards`` | gauge | queue, kind (waiting, reserved, total) | shards (``genimg exporter``) |
| ``genimg_backlog_up`` | gauge | — | 1 if Redis answered the scrape, else 0 (``genimg exporter``) |
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from genimg.errors import GenImgError, NonFiniteOutputError, RetryableError
from genimg.keepif import KEEP_IF_UNMET

EXPANSION_FAILURE_REASONS = ("expansion_empty", "expansion_too_long")
"""Item failure reasons of prompt expansion (:mod:`genimg.expand`), exported at 0 from the start."""
STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0,
                   60.0, 120.0, 300.0, 600.0)
"""Histogram buckets in seconds: from GPU sub-batches (ms) to CPU shards (minutes)."""

EXPAND_TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
"""Histogram buckets of tokens per expansion (the expander writes at most 256)."""


def _define() -> tuple[Counter, Counter, Counter, Counter, Counter, Counter, Histogram, Gauge, Counter, Counter,
                       Histogram, Histogram, Counter]:
    return (
        Counter("genimg_images_written", "Images committed to storage.", ["model", "format"]),
        Counter("genimg_bytes_written", "Encoded image bytes committed to storage.", ["model"]),
        Counter("genimg_items_failed", "Items recorded as failed, by reason.", ["reason"]),
        Counter("genimg_shards_committed", "Shards whose index was written (commit marker)."),
        Counter("genimg_shards_retried", "Shard retries scheduled after a retryable fault.", ["reason"]),
        Counter("genimg_shards_failed", "Shards that failed permanently.", ["reason"]),
        Histogram("genimg_stage_seconds", "Seconds per stage (infer and encode per sub-batch, "
                  "upload and whole shard per shard).", ["stage"], buckets=STAGE_BUCKETS_S),
        Gauge("genimg_shards_in_flight", "Shards being generated right now.", multiprocess_mode="livesum"),
        Counter("genimg_s3_throttled", "S3 responses that throttled a request (503, 429 or a throttling error "
                "code such as SlowDown), each attempt counted, by operation and error code.",
                ["operation", "code"]),
        Counter("genimg_s3_retries", "S3 request attempts that failed and were retried by botocore, by "
                "operation and error code (an S3 error code, an HTTP status, or a connection error's class).",
                ["operation", "code"]),
        Histogram("genimg_expand_tokens", "Tokens the prompt expander wrote per expansion (one per prompt, or "
                  "per item with expand.per=item).", ["expander"], buckets=EXPAND_TOKEN_BUCKETS),
        Histogram("genimg_expand_seconds", "Seconds of prompt expansion per expansion (a request's seconds over "
                  "the expansions in it).", ["expander"], buckets=STAGE_BUCKETS_S),
        Counter("genimg_regenerations", "Extra seeds tried for items whose image failed the job's keep_if "
                "(counted with the committed shard, like images written).", ["model"]),
    )


STAGES = ("infer", "encode", "upload", "shard", "expand")
"""Values of ``genimg_stage_seconds``'s ``stage`` label."""
def known_models() -> list[str]:
    """Values of the ``model`` label known in advance: every profile's Triton model (none if unreadable)."""
    from genimg.errors import ValidationError
    from genimg.profiles import load_profiles

    try:
        return load_profiles().triton_models()
    except ValidationError:
        return []


def _zero_known_series() -> None:
    """Export every series whose labels are known in advance at 0, before anything happens.

    A labelled series otherwise appears with its first increment, and
    Prometheus's ``rate()``/``increase()`` cannot see that first step (there is
    no earlier sample): a worker's first shard of each model would be missing
    from images/s, and its first failed shard from the failure ratio. Reasons
    are the names the task gives (:data:`SHARD_FAILURE_REASONS`,
    :data:`SHARD_RETRY_REASONS`); a reason outside them still counts, from its
    first step on.
    """
    from genimg.spec import IMAGE_FORMATS

    for model in known_models():
        BYTES_WRITTEN.labels(model)
        REGENERATIONS.labels(model)
        for fmt in IMAGE_FORMATS:
            IMAGES_WRITTEN.labels(model, fmt)
    for stage in STAGES:
        STAGE_SECONDS.labels(stage)
    ITEMS_FAILED.labels(NonFiniteOutputError.reason)
    ITEMS_FAILED.labels(KEEP_IF_UNMET)
    for reason in EXPANSION_FAILURE_REASONS:
        ITEMS_FAILED.labels(reason)
    for reason in SHARD_FAILURE_REASONS:
        SHARDS_FAILED.labels(reason)
    for reason in SHARD_RETRY_REASONS:
        SHARDS_RETRIED.labels(reason)


def _reason_names(base: type[GenImgError]) -> list[str]:
    """``reason`` (or the class name) of ``base`` and every subclass: what ``workers.tasks`` labels failures with."""
    out, todo = [], [base]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ != GenImgError.__module__:
            continue  # only genimg.errors' own tree: the same set in every process
        reason = cls.__dict__.get("reason")
        out.append(reason if isinstance(reason, str) else cls.__name__)
    return sorted(set(out))


SHARD_FAILURE_REASONS = tuple(_reason_names(GenImgError) + ["retries_exhausted"])
"""``genimg_shards_failed_total`` reasons exported at 0 from the start (a genimg error's reason or class name)."""
SHARD_RETRY_REASONS = tuple(_reason_names(RetryableError) + ["SoftTimeLimitExceeded"])
"""``genimg_shards_retried_total`` reasons exported at 0 from the start."""


(IMAGES_WRITTEN, BYTES_WRITTEN, ITEMS_FAILED, SHARDS_COMMITTED, SHARDS_RETRIED, SHARDS_FAILED, STAGE_SECONDS,
 SHARDS_IN_FLIGHT, S3_THROTTLED, S3_RETRIES, EXPAND_TOKENS, EXPAND_SECONDS, REGENERATIONS) = _define()
_zero_known_series()


def _use_multiprocess_values() -> None:
    """Make genimg's metrics write to ``PROMETHEUS_MULTIPROC_DIR`` even if prometheus_client came first.

    prometheus_client picks in-memory or file-backed values once, when it is
    first imported, from whether ``PROMETHEUS_MULTIPROC_DIR`` is set then. The
    ``genimg`` CLI imports it long before ``genimg worker`` knows its metrics
    directory, so every pool child would count in its own memory and the one
    /metrics endpoint would read an empty directory (case C4). This switches the
    value class and defines genimg's metrics anew (callers read them as
    ``metrics.NAME`` at call time, so they pick up the new objects).
    """
    global IMAGES_WRITTEN, BYTES_WRITTEN, ITEMS_FAILED, SHARDS_COMMITTED, SHARDS_RETRIED, SHARDS_FAILED
    global STAGE_SECONDS, SHARDS_IN_FLIGHT, S3_THROTTLED, S3_RETRIES, EXPAND_TOKENS, EXPAND_SECONDS, REGENERATIONS
    from prometheus_client import REGISTRY, values

    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.MultiProcessValue()
    for metric in (IMAGES_WRITTEN, BYTES_WRITTEN, ITEMS_FAILED, SHARDS_COMMITTED, SHARDS_RETRIED, SHARDS_FAILED,
                   STAGE_SECONDS, SHARDS_IN_FLIGHT, S3_THROTTLED, S3_RETRIES, EXPAND_TOKENS, EXPAND_SECONDS,
                   REGENERATIONS):
        try:
            REGISTRY.unregister(metric)
        except KeyError:
            pass
    (IMAGES_WRITTEN, BYTES_WRITTEN, ITEMS_FAILED, SHARDS_COMMITTED, SHARDS_RETRIED, SHARDS_FAILED, STAGE_SECONDS,
     SHARDS_IN_FLIGHT, S3_THROTTLED, S3_RETRIES, EXPAND_TOKENS, EXPAND_SECONDS, REGENERATIONS) = _define()
    _zero_known_series()


def prepare_multiproc_dir(path: str | os.PathLike[str]) -> Path:
    """Empty (or create) the multiprocess directory and point prometheus_client at it.

    Must run in the worker's main process before any child starts. Works
    whether or not prometheus_client was imported before (see
    :func:`_use_multiprocess_values`).
    """
    p = Path(path)
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(p)
    _use_multiprocess_values()
    return p


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Drop a dead process's live-gauge files (called when a pool child exits).

    Args:
        pid: the process.
        path: the multiprocess directory (default ``PROMETHEUS_MULTIPROC_DIR``; nothing to do if unset).
    """
    directory = str(path) if path is not None else os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)


def multiprocess_registry(path: str | os.PathLike[str] | None = None) -> CollectorRegistry:
    """A registry that aggregates every process's samples (for the /metrics endpoint).

    Args:
        path: the multiprocess directory (default ``PROMETHEUS_MULTIPROC_DIR``).
    """
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=None if path is None else str(path))
    return registry
