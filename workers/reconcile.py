"""``genimg reconcile``: re-enqueue exactly the shards whose messages were lost, so jobs finish on their own.

A shard of an unfinished job is *stranded* when it is in none of the places
that could still finish it:

* committed (``{p}:job:{id}:done``) or failed (``…:failed``),
* waiting in one of the queue's Redis lists (any priority),
* reserved: kombu's ``unacked`` hash (delivered and not acknowledged; genimg
  acks late, so this covers a running shard, a prefetched one and one waiting
  on a retry countdown, whose retry message is published before the old one is
  acknowledged).

kombu's Redis transport pops a message and records it as unacknowledged in two
steps, so a worker main process killed in between, or a Redis crash in
between, loses it (celery/kombu#305); a task that dies past Celery (a hard time
limit) is acknowledged as failed without a record. Such a shard stays stranded
for ever. Each pass, the reconciler reads the lists and the hash, then the
done and failed hashes, and times every stranded shard; one stranded in every
pass for longer than ``GENIMG_VISIBILITY_TIMEOUT_S + GENIMG_RETRY_BACKOFF_MAX_S``
(:func:`genimg.settings.stranded_after_s`) is re-enqueued, its stale running
record cleared, the action logged with job and shard and counted. Why that
bound cannot catch a shard that is still running: docs/operations.md,
"The reconciler". A shard re-enqueued more than ``GENIMG_RECONCILE_MAX_HEALS``
times is recorded failed (``lost_repeatedly``) instead, so the job finishes.
A job whose shards are all done or failed but that nobody finalised (the last
worker died in between) is finalised after the same bound.

Many replicas may run: only the holder of a Redis lease
(``{p}:reconciler:lease``, redis-py's ``Lock``, renewed every pass) acts; the
others wait to take over. Each pass costs one ``LRANGE`` sweep of the queue's
lists, one ``HSCAN`` of ``unacked`` and one ``HKEYS`` per unfinished job.

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| ``genimg_reconciler_shards_requeued_total`` | counter | queue | stranded shards re-enqueued |
| ``genimg_reconciler_shards_failed_total`` | counter | queue | shards lost more than the limit, recorded failed |
| ``genimg_reconciler_jobs_finalised_total`` | counter | queue | finished jobs nobody had finalised |
| ``genimg_reconciler_stranded_seconds`` | histogram | queue | time from first seen stranded to re-enqueued |
| ``genimg_reconciler_shards_stranded`` | gauge | queue | shards stranded now (being timed) |
| ``genimg_jobs_unfinished`` | gauge | queue | unfinished, uncancelled jobs (leader only) |
| ``genimg_reconciler_leader`` | gauge | — | 1 while this replica holds the lease |
| ``genimg_reconciler_last_pass_timestamp_seconds`` | gauge | — | end of the last complete pass |
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis
import typer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field

from genimg import jobs
from genimg.errors import ConfigError, GenImgError, QueueUnavailableError
from genimg.jobs import Keys
from genimg.queue import celery_priority, describe_redis_error, queued_shards, send_shards
from genimg.settings import GenimgSettings, WorkerSettings, stranded_after_s
from genimg.spec import JobSpec

log = logging.getLogger(__name__)

DEFAULT_PORT = 9181
"""TCP port of ``genimg reconcile``'s /metrics unless told otherwise."""
STRANDED_BUCKETS_S = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600, 900, 1800, 3600)


class ReconcileSettings(GenimgSettings):
    """``genimg reconcile``'s own settings (``GENIMG_RECONCILE_*``); the rest comes from :class:`WorkerSettings`."""

    reconcile_interval_s: float = Field(default=30.0, gt=0, le=3600)
    """Seconds between two passes."""
    reconcile_lease_s: float = Field(default=120.0, gt=0, le=86400)
    """Lifetime of the leader's lease; renewed every pass, so keep it above the interval (checked)."""
    reconcile_max_heals: int = Field(default=5, ge=1, le=1000)
    """Re-enqueues of one shard before it is recorded failed (``lost_repeatedly``)."""
    reconcile_port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """Port of /metrics (0 = none)."""
    reconcile_addr: str = "0.0.0.0"


@dataclass
class PassReport:
    """What one pass saw and did."""

    leader: bool
    unfinished_jobs: int = 0
    stranded: int = 0
    requeued: list[tuple[str, int, float]] = field(default_factory=list)
    """``(job_id, shard, seconds stranded)`` of each shard re-enqueued."""
    failed: list[tuple[str, int]] = field(default_factory=list)
    finalised: list[str] = field(default_factory=list)


class ReconcilerMetrics:
    """The reconciler's metrics, on a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requeued = Counter("genimg_reconciler_shards_requeued", "Stranded shards re-enqueued.", ["queue"],
                                registry=r)
        self.failed = Counter("genimg_reconciler_shards_failed", "Shards lost more often than "
                              "GENIMG_RECONCILE_MAX_HEALS, recorded failed.", ["queue"], registry=r)
        self.finalised = Counter("genimg_reconciler_jobs_finalised", "Finished jobs nobody had finalised.",
                                 ["queue"], registry=r)
        self.stranded_seconds = Histogram("genimg_reconciler_stranded_seconds", "Seconds from a shard first seen "
                                          "stranded to its re-enqueue.", ["queue"], buckets=STRANDED_BUCKETS_S,
                                          registry=r)
        self.stranded = Gauge("genimg_reconciler_shards_stranded", "Shards stranded now (in no queue list, not "
                              "unacked, not done or failed), being timed.", ["queue"], registry=r)
        self.unfinished = Gauge("genimg_jobs_unfinished", "Unfinished, uncancelled jobs (the lease holder's "
                                "count; absent elsewhere).", ["queue"], registry=r)
        self.leader = Gauge("genimg_reconciler_leader", "1 while this replica holds the reconciler lease.",
                            registry=r)
        self.last_pass = Gauge("genimg_reconciler_last_pass_timestamp_seconds", "Unix time the last complete "
                               "pass ended.", registry=r)


class Reconciler:
    """One replica of the reconciler (see the module docstring).

    Args:
        client: Redis client of the broker database (genimg's keys live there too).
        worker: the workers' settings (queue, key prefix, timing that derives the bound).
        settings: interval, lease, heal limit.
        storage: S3 settings, to finalise jobs (``None``: read from the environment when needed).
        metrics: where to count (a fresh registry by default).
        stranded_after: override of the bound in seconds (tests); default :func:`stranded_after_s`.
    """

    def __init__(self, client: redis.Redis, worker: WorkerSettings, settings: ReconcileSettings,
                 storage: Any = None, metrics: ReconcilerMetrics | None = None,
                 stranded_after: float | None = None) -> None:
        self.r, self.worker, self.settings = client, worker, settings
        self.queue, self.keys = worker.queue, Keys(worker.key_prefix)
        self.bound_s = stranded_after_s(worker) if stranded_after is None else stranded_after
        self.storage = storage
        self.metrics = metrics or ReconcilerMetrics()
        self.name = f"reconciler-{uuid.uuid4().hex[:8]}"
        self.lock = client.lock(self.keys.reconciler_lease, timeout=settings.reconcile_lease_s,
                                blocking=False, thread_local=False)
        self.first_seen: dict[tuple[str, int], float] = {}
        self.finished_seen: dict[str, float] = {}
        self._specs: dict[str, JobSpec] = {}
        self._stores: dict[str, Any] = {}
        self._app: Any = None

    # ---- lease

    def lead(self) -> bool:
        """Take or renew the lease; True while this replica holds it."""
        try:
            if self.lock.owned():
                self.lock.reacquire()
                held = True
            else:
                held = bool(self.lock.acquire(blocking=False))
                if held:
                    log.info("%s holds the reconciler lease (queue %s, key prefix %s, bound %.0f s)", self.name,
                             self.queue, self.keys.prefix, self.bound_s)
                    self.first_seen.clear()  # timings of another leader's era are not ours to trust
                    self.finished_seen.clear()
        except redis.exceptions.LockError:
            held = False
        self.metrics.leader.set(1 if held else 0)
        return held

    # ---- one pass

    def run_pass(self) -> PassReport:
        """One pass: lead or not, and if leading, heal what has been stranded longer than the bound.

        Raises:
            QueueUnavailableError: Redis failed during the pass (nothing half-done matters: a pass only
                adds messages for shards it has seen stranded for longer than the bound).
        """
        from kombu.exceptions import KombuError, OperationalError

        try:
            if not self.lead():
                self.metrics.unfinished.clear()
                self.metrics.stranded.clear()
                return PassReport(leader=False)
            report = self._pass()
        except QueueUnavailableError:
            self.metrics.leader.set(0)
            raise
        except (redis.RedisError, OperationalError, KombuError, OSError) as e:
            self.metrics.leader.set(0)
            raise QueueUnavailableError(f"Redis unavailable during a reconcile pass: {describe_redis_error(e)}") from e
        self.metrics.unfinished.labels(self.queue).set(report.unfinished_jobs)
        self.metrics.stranded.labels(self.queue).set(report.stranded)
        self.metrics.last_pass.set(time.time())
        return report

    def _pass(self) -> PassReport:
        now = time.monotonic()
        report = PassReport(leader=True)
        unfinished = self._unfinished_jobs(now, report)
        report.unfinished_jobs = len(unfinished)
        if not unfinished:
            self.first_seen.clear()
            return report
        present = queued_shards(self.r, self.queue, set(unfinished))  # lists and unacked first, then done/failed
        finished_of = jobs.finished_shards(self.r, self.keys, list(unfinished))
        stranded_now: set[tuple[str, int]] = set()
        for job_id, spec in unfinished.items():
            finished = finished_of[job_id]
            queued = present.get(job_id, set())
            for shard in range(spec.shard_plan().num_shards):
                if shard not in finished and shard not in queued:
                    stranded_now.add((job_id, shard))
        self.first_seen = {k: v for k, v in self.first_seen.items() if k in stranded_now}
        due: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for key in sorted(stranded_now):
            first = self.first_seen.setdefault(key, now)
            if now - first >= self.bound_s:
                due[key[0]].append((key[1], now - first))
        report.stranded = len(stranded_now)
        for job_id, shards in due.items():
            if not self.lock.owned():  # lost the lease mid-pass: the new leader decides
                break
            self._heal(unfinished[job_id], shards, report)
        report.stranded -= len(report.requeued) + len(report.failed)
        return report

    def _unfinished_jobs(self, now: float, report: PassReport) -> dict[str, JobSpec]:
        """Specs of the jobs with shards neither done nor failed (not cancelled); finalise finished ones."""
        ids = jobs.all_job_ids(self.r, self.keys)
        out: dict[str, JobSpec] = {}
        finished_ids = set()
        for job_id, flags in zip(ids, jobs.job_flags(self.r, self.keys, ids), strict=True):
            if flags.finalised or flags.cancelled:
                continue
            spec = self._spec(job_id)
            if spec is None:
                continue
            if flags.shards_done + flags.shards_failed >= spec.shard_plan().num_shards:
                finished_ids.add(job_id)
                first = self.finished_seen.setdefault(job_id, now)
                if now - first >= self.bound_s and self._finalise(spec):
                    report.finalised.append(job_id)
                continue
            out[job_id] = spec
        self.finished_seen = {k: v for k, v in self.finished_seen.items() if k in finished_ids}
        return out

    def _spec(self, job_id: str) -> JobSpec | None:
        if job_id not in self._specs:
            raw = jobs.read_spec_json(self.r, self.keys, job_id)
            if raw is None:
                return None  # Redis lost the job: only `genimg resume --output …` can bring it back
            try:
                self._specs[job_id] = JobSpec.from_json(raw)
            except GenImgError as e:
                log.error("job %s has an unreadable spec, skipped: %s", job_id, e)
                return None
        return self._specs[job_id]

    # ---- actions

    def _heal(self, spec: JobSpec, shards: list[tuple[int, float]], report: PassReport) -> None:
        job_id = spec.job_id
        open_ = jobs.unfinished(self.r, self.keys, job_id, [s for s, _ in shards])
        todo = [(s, t) for (s, t), still in zip(shards, open_, strict=True) if still]
        if not todo:
            return
        counts = jobs.count_heals(self.r, self.keys, job_id, [s for s, _ in todo])
        requeue = [(s, t, n) for (s, t), n in zip(todo, counts, strict=True) if n <= self.settings.reconcile_max_heals]
        give_up = [(s, t, n) for (s, t), n in zip(todo, counts, strict=True) if n > self.settings.reconcile_max_heals]
        if requeue:
            jobs.clear_running(self.r, self.keys, job_id, [s for s, _, _ in requeue])
            send_shards(self.app, self.queue, job_id, celery_priority(spec.priority), [s for s, _, _ in requeue])
            for shard, stranded_s, n in requeue:
                log.warning("re-enqueued stranded shard job=%s shard=%d stranded_s=%.1f heal=%d/%d", job_id, shard,
                            stranded_s, n, self.settings.reconcile_max_heals)
                self.metrics.requeued.labels(self.queue).inc()
                self.metrics.stranded_seconds.labels(self.queue).observe(stranded_s)
                report.requeued.append((job_id, shard, round(stranded_s, 2)))
                self.first_seen.pop((job_id, shard), None)
        for shard, stranded_s, n in give_up:
            reason = (f"lost_repeatedly: its message was lost {n - 1} times and re-enqueued by the reconciler "
                      f"each time (GENIMG_RECONCILE_MAX_HEALS={self.settings.reconcile_max_heals})")
            jobs.mark_failed(self.r, self.keys, job_id, shard, reason)
            log.error("recorded stranded shard as failed job=%s shard=%d stranded_s=%.1f: %s", job_id, shard,
                      stranded_s, reason)
            self.metrics.failed.labels(self.queue).inc()
            report.failed.append((job_id, shard))
            self.first_seen.pop((job_id, shard), None)

    def _finalise(self, spec: JobSpec) -> bool:
        from genimg.stores import open_job_store

        try:
            store, layout = open_job_store(spec.output, spec.job_id, self.storage, cache=self._stores)
            done = jobs.finalize_if_complete(self.r, self.keys, store, layout, spec)
        except GenImgError as e:
            log.warning("could not finalise finished job %s yet: %s", spec.job_id, e)
            return False
        if done:
            log.warning("finalised finished job nobody had finalised job=%s", spec.job_id)
            self.metrics.finalised.labels(self.queue).inc()
        return done

    @property
    def app(self) -> Any:
        if self._app is None:
            from genimg.queue import producer_app

            self._app = producer_app(self.worker, name="genimg-reconciler")
        return self._app

    def close(self) -> None:
        """Release the lease (if held), the broker connection and the stores."""
        try:
            if self.lock.owned():
                self.lock.release()
        except redis.RedisError:
            pass
        if self._app is not None:
            self._app.close()
        for store, _ in self._stores.values():
            store.close()


def validate_settings() -> tuple[WorkerSettings, ReconcileSettings, Any]:
    """Every ``GENIMG_*`` value ``genimg reconcile`` reads, checked at once.

    Raises:
        ConfigError: one line naming the first invalid variable and the allowed values.
    """
    from genimg.settings import StorageSettings, check_retired_variables, check_timing, load_settings
    from genimg.stores.s3_client import check_storage

    check_retired_variables()
    worker = load_settings(WorkerSettings)
    if worker.check_timing:
        check_timing(worker)
    settings = load_settings(ReconcileSettings)
    if settings.reconcile_lease_s <= settings.reconcile_interval_s:
        raise ConfigError(f"invalid GENIMG_RECONCILE_LEASE_S={settings.reconcile_lease_s:g}: allowed a number above "
                          f"GENIMG_RECONCILE_INTERVAL_S ({settings.reconcile_interval_s:g}), or the lease lapses "
                          "between passes")
    storage = StorageSettings.checked()
    check_storage(storage)
    return worker, settings, storage


def reconcile(
    once: Annotated[bool, typer.Option("--once", help="One pass, print what it did, exit.")] = False,
    port: Annotated[int | None, typer.Option(
        "--port", help=f"/metrics port, 0 = none (default {DEFAULT_PORT}) [env GENIMG_RECONCILE_PORT].",
        show_default=False)] = None,
) -> None:
    """Re-enqueue shards whose messages were lost, so unfinished jobs finish without an operator.

    Run it beside the exporter (any number of replicas: one holds a Redis lease
    and acts). It reads the workers' GENIMG_REDIS_URL, GENIMG_QUEUE,
    GENIMG_KEY_PREFIX, GENIMG_VISIBILITY_TIMEOUT_S and GENIMG_RETRY_BACKOFF_MAX_S
    (they set how long a shard must be missing), and GENIMG_S3_* to finalise jobs.

    Example: genimg reconcile --port 9181
    """
    import os

    from genimg.exporter import start_exporter
    from genimg.redaction import redact_url, register_url_secret

    if port is not None:
        os.environ["GENIMG_RECONCILE_PORT"] = str(port)
    try:
        worker, settings, storage = validate_settings()
    except ConfigError as e:
        typer.echo(f"genimg reconcile: refusing to start: {e}", err=True)
        raise typer.Exit(2) from None
    url = worker.redis_url.get_secret_value()
    register_url_secret(url)
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30)
    rec = Reconciler(client, worker, settings, storage)
    if once:
        try:
            report = rec.run_pass()
        except GenImgError as e:
            typer.echo(f"genimg reconcile: {type(e).__name__}: {e}", err=True)
            raise typer.Exit(3) from None
        finally:
            rec.close()
        typer.echo(f"leader={report.leader} unfinished_jobs={report.unfinished_jobs} stranded={report.stranded} "
                   f"requeued={report.requeued} failed={report.failed} finalised={report.finalised}")
        return
    if settings.reconcile_port:
        try:
            start_exporter(rec.metrics.registry, settings.reconcile_port, settings.reconcile_addr)
        except OSError as e:
            typer.echo(f"genimg reconcile: cannot serve /metrics on GENIMG_RECONCILE_PORT={settings.reconcile_port}: "
                       f"{e.strerror}", err=True)
            raise typer.Exit(3) from None
    log.info("%s started: queue %s, key prefix %s, Redis %s, a shard missing for %.0f s is re-enqueued, pass "
             "every %g s", rec.name, worker.queue, worker.key_prefix, redact_url(url), rec.bound_s,
             settings.reconcile_interval_s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        try:
            rec.run_pass()
        except GenImgError as e:  # Redis restarting: the next pass tries again
            log.warning("reconcile pass skipped: %s", e)
        stop.wait(settings.reconcile_interval_s)  # the pass period (also wakes at once on SIGTERM)
    rec.close()
    log.info("%s stopped", rec.name)
