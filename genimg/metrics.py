"""genimg's Prometheus metrics (prefix ``genimg_``), correct under Celery prefork.

Workers run prometheus_client in multiprocess mode: every process writes its
samples to ``PROMETHEUS_MULTIPROC_DIR``; one HTTP endpoint per worker (pod)
aggregates them. :func:`prepare_multiproc_dir` wipes the directory at start
(stale files of a dead run would be added in); :func:`mark_process_dead`
removes a recycled child's live-gauge files (case C4).

| metric | type | labels | unit |
| --- | --- | --- | --- |
| ``genimg_images_written_total`` | counter | model, format | images |
| ``genimg_bytes_written_total`` | counter | model | bytes (encoded images) |
| ``genimg_items_failed_total`` | counter | reason | items |
| ``genimg_shards_committed_total`` | counter | — | shards |
| ``genimg_shards_retried_total`` | counter | reason | shard retries scheduled |
| ``genimg_shards_failed_total`` | counter | reason | shards failed permanently |
| ``genimg_stage_seconds`` | histogram | stage (infer, encode, upload, shard) | seconds |
| ``genimg_shards_in_flight`` | gauge (livesum) | — | shards |
| ``genimg_backlog_shards`` | gauge | queue, kind (waiting, reserved, total) | shards (exporter) |
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0,
                   60.0, 120.0, 300.0, 600.0)
"""Histogram buckets in seconds: from GPU sub-batches (ms) to CPU shards (minutes)."""

IMAGES_WRITTEN = Counter("genimg_images_written", "Images committed to storage.", ["model", "format"])
BYTES_WRITTEN = Counter("genimg_bytes_written", "Encoded image bytes committed to storage.", ["model"])
ITEMS_FAILED = Counter("genimg_items_failed", "Items recorded as failed, by reason.", ["reason"])
SHARDS_COMMITTED = Counter("genimg_shards_committed", "Shards whose index was written (commit marker).")
SHARDS_RETRIED = Counter("genimg_shards_retried", "Shard retries scheduled after a retryable fault.", ["reason"])
SHARDS_FAILED = Counter("genimg_shards_failed", "Shards that failed permanently.", ["reason"])
STAGE_SECONDS = Histogram("genimg_stage_seconds", "Seconds per stage (infer and encode per sub-batch, "
                          "upload and whole shard per shard).", ["stage"], buckets=STAGE_BUCKETS_S)
SHARDS_IN_FLIGHT = Gauge("genimg_shards_in_flight", "Shards being generated right now.",
                         multiprocess_mode="livesum")


def prepare_multiproc_dir(path: str | os.PathLike[str]) -> Path:
    """Empty (or create) the multiprocess directory and point prometheus_client at it.

    Must run in the worker's main process before any child starts.
    """
    p = Path(path)
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(p)
    return p


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live-gauge files (called when a pool child exits)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def multiprocess_registry() -> CollectorRegistry:
    """A registry that aggregates every process's samples (for the /metrics endpoint)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry
