"""The Celery app and each worker process's context (clients created after fork).

Import-time work is limited to reading settings: the Triton, Redis and S3
clients of a pool child are built lazily in that child (:func:`context`), never
inherited across fork.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_shutdown

from genimg import metrics
from genimg.jobs import Keys
from genimg.queue import celery_config
from genimg.redaction import redact_all_handlers, register_url_secret
from genimg.settings import StorageSettings, TritonSettings, WorkerSettings
from genimg.spec import JobSpec

if TYPE_CHECKING:
    from genimg.layout import Layout
    from genimg.pipeline import Infer
    from genimg.stores import ManagedStore

log = logging.getLogger(__name__)


SETTINGS = WorkerSettings()
register_url_secret(SETTINGS.redis_url.get_secret_value())  # no log line shows the Redis password (C7)
app = Celery("genimg")
app.conf.update(celery_config(SETTINGS))


def required_models() -> list[str]:
    """The Triton models this worker needs ready before it takes a shard (the one place that says).

    Used by the consumer gate (:mod:`workers.gate`), the per-process context
    and ``genimg worker --check``: every model of every profile in ``GENIMG_PROFILES_DIR``
    (the bundled profiles by default), prompt stages included, and the prompt expander
    ``GENIMG_TRITON_EXPANDER`` (default ``prompt_expander``, which ``build-repo`` writes unless
    ``--no-expander``/``--profiles-only``; empty: none).
    """
    from genimg.profiles import load_profiles

    models = load_profiles().triton_models()
    expander = TritonSettings.from_env().triton_expander
    return models if not expander or expander in models else [*models, expander]


def _add_gate() -> None:
    from workers.gate import TritonGate

    app.steps["consumer"].add(TritonGate)


_add_gate()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redact_celery_handlers(**_: object) -> None:
    """Celery installs handlers of its own (root, ``celery.task``, ``multiprocessing``): redact them all (C7)."""
    redact_all_handlers()


@dataclass
class WorkerContext:
    """Per-process clients and caches of a worker."""

    settings: WorkerSettings
    redis: redis.Redis
    keys: Keys
    infer: Infer
    storage_settings: StorageSettings
    hostname: str = field(default_factory=socket.gethostname)
    _stores: dict[str, tuple[ManagedStore, str]] = field(default_factory=dict)
    _specs: OrderedDict[str, JobSpec] = field(default_factory=OrderedDict)

    def spec(self, job_id: str) -> JobSpec:
        """The job's spec, cached per process (an LRU of 64 jobs)."""
        from genimg.jobs import load_spec

        if job_id in self._specs:
            self._specs.move_to_end(job_id)
            return self._specs[job_id]
        spec = load_spec(self.redis, self.keys, job_id)
        self._specs[job_id] = spec
        while len(self._specs) > 64:
            self._specs.popitem(last=False)
        return spec

    def store_for(self, spec: JobSpec) -> tuple[ManagedStore, Layout]:
        """(store, layout) of the job's output URL; one store per bucket, reused.

        Its connection pool fits the most threads that call it at once: the shard's uploads
        (``GENIMG_UPLOAD_THREADS``) or the finalisation's index reads (``genimg.manifest.READ_THREADS``).
        """
        from genimg.manifest import READ_THREADS
        from genimg.stores import open_job_store

        return open_job_store(spec.output, spec.job_id, self.storage_settings, cache=self._stores,
                              callers=max(SETTINGS.upload_threads, READ_THREADS))


_CTX: WorkerContext | None = None
_CTX_PID: int | None = None
_LOCK = threading.Lock()


def context() -> WorkerContext:
    """This process's context, built on first use after fork; waits for the Triton models."""
    global _CTX, _CTX_PID
    with _LOCK:
        if _CTX is None or _CTX_PID != os.getpid():
            from genimg.pipeline import Infer
            from genimg.triton.client import InferenceClient

            tset = TritonSettings.from_env()
            client = InferenceClient.from_settings(tset)
            try:
                client.wait_ready(required_models(), timeout_s=tset.triton_ready_timeout_s)
            except BaseException:
                client.close()  # the shard is retried and builds a new one
                raise
            _CTX = WorkerContext(
                settings=SETTINGS,
                redis=redis.Redis.from_url(SETTINGS.redis_url.get_secret_value(), socket_timeout=30,
                                           socket_connect_timeout=10, health_check_interval=10),
                keys=Keys(SETTINGS.key_prefix),
                infer=Infer(client),
                storage_settings=StorageSettings.from_env(),
            )
            _CTX_PID = os.getpid()
        return _CTX


def drop_inference_client() -> None:
    """Close this process's Triton client; the next :func:`context` builds a new one.

    Called after Triton was unreachable: a new gRPC channel connects at once,
    where the old one may sit in gRPC's reconnect backoff (up to two minutes)
    long after Triton is back.
    """
    global _CTX
    with _LOCK:
        if _CTX is not None and _CTX_PID == os.getpid():
            try:
                _CTX.infer.client.close()
            except Exception as e:  # noqa: BLE001 - closing a broken channel; nothing to do about it
                log.debug("closing the Triton client: %s", e)
            _CTX = None


@worker_process_shutdown.connect
def _on_child_exit(pid=None, **_: object) -> None:
    metrics.mark_process_dead(pid or os.getpid())


# Register the task with the app.
import workers.tasks  # noqa: E402,F401 - registers the task; it imports `app` from this module, so it comes last
