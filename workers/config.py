"""Worker settings (``GENIMG_*``) and the timing invariants checked before a worker starts.

Case C1: Redis redelivers an unacknowledged task after the visibility
timeout, so a shard that runs (or waits on a retry countdown) longer than it
would run twice. :func:`check_timing` refuses such settings.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from genimg.errors import ConfigError
from genimg.settings import RedisUrl


class WorkerSettings(BaseSettings):
    """Settings of a Celery worker process (all from ``GENIMG_*`` variables)."""

    model_config = SettingsConfigDict(env_prefix="GENIMG_", frozen=True, extra="ignore")

    redis_url: RedisUrl = SecretStr("redis://127.0.0.1:6379/0")
    """Broker and result backend; ``rediss://`` for TLS; a password in the URL is never logged."""
    queue: str = Field(default="genimg", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key_prefix: str = Field(default="genimg", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    visibility_timeout_s: int = Field(default=300, gt=0)
    task_hard_time_limit_s: int = Field(default=240, gt=0)
    task_soft_time_limit_s: int = Field(default=210, gt=0)
    retry_backoff_base_s: float = Field(default=2.0, gt=0)
    retry_backoff_max_s: int = Field(default=60, gt=0)
    """Largest retry countdown; must stay below the visibility timeout."""
    retry_budget_s: float = Field(default=600.0, ge=0)
    """How long a shard keeps retrying retryable faults, from its first one, before it is failed
    (``retries_exhausted``). Time, not a count: it must outlast a Triton restart that reloads models."""
    triton_check_interval_s: float = Field(default=2.0, gt=0, le=60)
    """How often the worker's main process asks Triton whether the models it needs are ready; it takes
    shards only while they are (:mod:`workers.gate`)."""
    unacked_restore_interval_s: int = Field(default=5, gt=0)
    """How often kombu sweeps for messages past their visibility timeout."""
    concurrency: int = Field(default=1, gt=0)
    max_tasks_per_child: int = Field(default=0, ge=0)
    """Recycle a pool child after this many shards (0 = never)."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the worker's /metrics endpoint (0 = no endpoint)."""
    metrics_dir: str = ""
    """prometheus_client multiprocess directory (PROMETHEUS_MULTIPROC_DIR); wiped at start."""
    upload_threads: int = Field(default=4, gt=0, le=64)
    infer_inflight: int = Field(default=2, gt=0, le=64)
    """Triton requests (of ``sub_batch_size`` items each) one pool process keeps in flight."""
    check_timing: bool = True
    """Refuse to start on unsafe timing (C1). Only tests switch this off."""


def check_timing(s: WorkerSettings) -> None:
    """Raise ConfigError unless soft < hard < visibility timeout and max countdown < visibility timeout.

    Raises:
        ConfigError: naming the two settings that conflict.
    """
    if not s.task_soft_time_limit_s < s.task_hard_time_limit_s:
        raise ConfigError(
            f"GENIMG_TASK_SOFT_TIME_LIMIT_S ({s.task_soft_time_limit_s}) must be below "
            f"GENIMG_TASK_HARD_TIME_LIMIT_S ({s.task_hard_time_limit_s})")
    if not s.task_hard_time_limit_s < s.visibility_timeout_s:
        raise ConfigError(
            f"GENIMG_VISIBILITY_TIMEOUT_S ({s.visibility_timeout_s}) must exceed "
            f"GENIMG_TASK_HARD_TIME_LIMIT_S ({s.task_hard_time_limit_s}): Redis would redeliver a "
            "shard that is still running (case C1)")
    if not s.retry_backoff_max_s < s.visibility_timeout_s:
        raise ConfigError(
            f"GENIMG_VISIBILITY_TIMEOUT_S ({s.visibility_timeout_s}) must exceed "
            f"GENIMG_RETRY_BACKOFF_MAX_S ({s.retry_backoff_max_s}): a shard waiting on its retry "
            "countdown would be redelivered (case C1)")


def stranded_after_s(s: WorkerSettings) -> float:
    """Seconds a shard must be missing from every queue structure before the reconciler re-enqueues it.

    ``visibility_timeout_s + retry_backoff_max_s``: a run of a shard whose
    message Redis no longer holds ends within the hard time limit (< the
    visibility timeout, :func:`check_timing`) after a retry countdown of at
    most ``retry_backoff_max_s``; so once a shard has been missing that long,
    no worker can still be running it (docs/operations.md, "The reconciler").
    """
    return float(s.visibility_timeout_s + s.retry_backoff_max_s)


def verified_tls_url(url: str) -> str:
    """``url``, with ``ssl_cert_reqs=required`` added to a ``rediss://`` URL that does not say.

    kombu reads a bare ``rediss://`` URL as "TLS without checking the server's
    certificate" (``CERT_NONE``), while redis-py checks it; genimg checks it
    everywhere unless the URL explicitly says ``ssl_cert_reqs=none``.
    """
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return url
    return url + ("&" if parts.query else ("" if url.endswith("?") else "?")) + "ssl_cert_reqs=required"


def celery_config(s: WorkerSettings) -> dict:
    """The Celery configuration genimg runs with (JSON only, acks late, prefetch 1)."""
    from genimg.queue import PRIORITY_STEPS

    url = verified_tls_url(s.redis_url.get_secret_value())
    transport = {
        "visibility_timeout": s.visibility_timeout_s,
        "unacked_restore_interval": s.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        "priority_steps": PRIORITY_STEPS,
        "queue_order_strategy": "priority",
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
        "retry_on_timeout": True,
        "health_check_interval": 10,
    }
    return {
        "broker_url": url,
        # No result backend: progress lives in genimg's own Redis records (genimg.jobs) and
        # nothing reads Celery results. With one, Celery writes a task's state to Redis while
        # it handles a lost broker connection; when Redis is restarting that write raises
        # and the worker exits (celery 5.6, seen in tests/chaos).
        "result_backend": None,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": s.task_hard_time_limit_s,
        "task_soft_time_limit": s.task_soft_time_limit_s,
        "task_default_queue": s.queue,
        "task_default_priority": 4,
        "task_queue_max_priority": 9,
        "task_track_started": False,
        "result_expires": 24 * 3600,
        "worker_max_tasks_per_child": s.max_tasks_per_child or None,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": False,
    }
