"""The chaos run's driver: a private stack, a seeded fault schedule, the checks and the report.

One job runs twice on one stack of real processes:

1. **undisturbed**: submitted with :meth:`producer.Client.submit` under key
   prefix/queue ``…-clean``; its wall time is the baseline;
2. **chaos**: the *same* job (same spec, same job id, so every tar must come
   out byte-identical) started from its stored spec under another output
   prefix and another key prefix/queue (``…-chaos``), while
   :class:`ChaosDriver` injects the faults of a schedule that
   :func:`make_schedule` derives from a seed alone.

The stack (:class:`ChaosStack`): a ``redis-server`` of the test's own on a
free port with AOF (``appendfsync always``), a ``tritonserver`` on the cpu
repository, moto's S3 server behind a :class:`~tests.fixtures.faultproxy.FaultProxy`
(workers talk to the proxy; the test reads and checks through moto directly),
and ``genimg worker`` processes with a short visibility timeout.

Faults, each fired when the job's done-shard count (Redis' done hash) reaches
the event's threshold (a condition, not a timer):

* ``kill_child``: SIGKILL the pool child of one worker (it is mid-shard nearly
  always: each worker runs one shard after the other); Celery replaces it and
  the shard is redelivered at once (``task_reject_on_worker_lost``);
* ``kill_main``: SIGKILL one worker's main process and start a replacement;
  its shard comes back after the visibility timeout;
* ``restart_redis``: SIGKILL redis-server and start it again on the same port
  and data directory (only what the AOF holds survives, as after a pod crash);
* ``restart_triton``: SIGKILL tritonserver's process group and start it again
  on the same ports;
* ``s3_faults``: for ``duration_s`` seconds the proxy answers a share of S3
  requests with ``503 SlowDown`` and resets the connection of another share.

No operator: the driver never resumes. A ``genimg reconcile`` process (two
replicas, one holding the lease) re-enqueues shards whose messages were lost;
the run fails if the job finishes with a failed shard, or stays unfinished with
nothing queued or unacknowledged for longer than :func:`stall_limit_s` (the
reconciler's bound plus a margin): "not healed". The report lists every shard
the reconciler re-enqueued and how long it stayed stranded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from genimg import jobs
from genimg.imaging import decode
from genimg.layout import SPEC_OBJECT
from genimg.queue import backlog
from genimg.jobs import Keys
from genimg.shards import committed_shards, read_shard_index
from genimg.index import STATUS_OK
from genimg.verify import verify_manifest
from genimg.layout import Layout
from genimg.spec import JobSpec
from genimg.stores.s3 import S3Store
from genimg.stores.base import sha256_hex
from genimg.triton.server import TritonServer
from producer import Client
from tests.fixtures.faultproxy import FaultProxy, RecordedRequest
from tests.fixtures.redisserver import RedisServer
from tests.fixtures.s3 import storage_settings_for
from tests.fixtures.tcpforward import TcpForwarder  # noqa: F401 - re-exported for tests/chaos/test_chaos.py
from tests.fixtures.workers import Stack, WorkerProc, wait_for

WORKER_ENV: dict[str, str] = {
    "GENIMG_CONCURRENCY": "1",
    "GENIMG_VISIBILITY_TIMEOUT_S": "30",
    "GENIMG_TASK_HARD_TIME_LIMIT_S": "20",
    "GENIMG_TASK_SOFT_TIME_LIMIT_S": "15",
    "GENIMG_RETRY_BACKOFF_BASE_S": "0.5",
    "GENIMG_RETRY_BACKOFF_MAX_S": "8",
    "GENIMG_RETRY_BUDGET_S": "600",
    "GENIMG_UNACKED_RESTORE_INTERVAL_S": "5",
    "GENIMG_TRITON_TIMEOUT_S": "10",
    "GENIMG_TRITON_READY_TIMEOUT_S": "10",
    "GENIMG_TRITON_CHECK_INTERVAL_S": "1",
    "GENIMG_S3_MAX_ATTEMPTS": "5",
    "GENIMG_S3_CONNECT_TIMEOUT_S": "5",
    "GENIMG_S3_READ_TIMEOUT_S": "20",
    # Every shard tar goes up as a multipart upload, so a worker killed mid-upload
    # can leave an unfinished one behind: the run checks that none remains.
    "GENIMG_S3_MULTIPART_THRESHOLD_BYTES": str(16 * 1024),
    # The reconciler: a pass every 2 s; a shard missing for 30 + 8 s is re-enqueued.
    "GENIMG_RECONCILE_INTERVAL_S": "2",
    "GENIMG_RECONCILE_LEASE_S": "10",
}
"""Worker (and reconciler) settings of the chaos run: visibility timeout 30 s > hard limit 20 s > soft 15 s
(redelivery after a killed main process within ~35 s), a 10-minute retry budget that outlasts a Triton
restart (countdowns <= 8 s), and multipart uploads for every tar."""

RECONCILERS = 2
"""``genimg reconcile`` replicas of the chaos run (one holds the lease and acts)."""


def stall_limit_s(env: dict[str, str]) -> float:
    """Longest the job may stay unfinished with nothing queued or unacknowledged before the run fails.

    The reconciler's bound (visibility timeout + largest retry countdown), two
    passes, and 30 s of margin for a Redis restart in between.
    """
    bound = float(env["GENIMG_VISIBILITY_TIMEOUT_S"]) + float(env["GENIMG_RETRY_BACKOFF_MAX_S"])
    return bound + 2 * float(env["GENIMG_RECONCILE_INTERVAL_S"]) + 30.0


POLL_S = 0.25
"""Poll interval of the driver's loop (a polling period; every wait has a condition and a deadline)."""

FAULT_KINDS = ("kill_child", "kill_main", "restart_redis", "restart_triton", "s3_faults")


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class FaultEvent:
    """One scheduled fault.

    Attributes:
        kind: one of :data:`FAULT_KINDS`.
        at_shards: fire once the job has this many shards done.
        target: picks the worker (``target % live workers``) for kills.
        duration_s: seconds the S3 faults last (``s3_faults`` only).
        share_503: share of S3 requests answered ``503 SlowDown`` (``s3_faults``).
        share_reset: share of S3 requests whose connection is reset (``s3_faults``).
    """

    kind: str
    at_shards: int
    target: int = 0
    duration_s: float = 0.0
    share_503: float = 0.0
    share_reset: float = 0.0


def make_schedule(seed: int, num_shards: int, *, kill_pairs: int = 3, first_frac: float = 0.05,
                  last_frac: float = 0.6) -> list[FaultEvent]:
    """The faults of a run, derived from ``seed`` alone (the same seed replays the same schedule).

    ``kill_pairs`` times a pool child then a main process is killed; one Redis
    restart, one Triton restart and one S3 fault window are put at random
    places in that sequence; the thresholds are distinct done-shard counts in
    ``[first_frac, last_frac) × num_shards``, ascending.
    """
    rng = random.Random(seed)
    order = [kind for _ in range(kill_pairs) for kind in ("kill_child", "kill_main")]
    for kind in ("restart_redis", "restart_triton", "s3_faults"):
        order.insert(rng.randint(0, len(order)), kind)
    lo = max(1, int(num_shards * first_frac))
    hi = max(lo + len(order), int(num_shards * last_frac))
    thresholds = sorted(rng.sample(range(lo, hi), len(order)))
    events = []
    for kind, at in zip(order, thresholds):
        extra: dict[str, Any] = {}
        if kind == "s3_faults":
            extra = {"duration_s": round(rng.uniform(15.0, 30.0), 1), "share_503": round(rng.uniform(0.1, 0.2), 3),
                     "share_reset": round(rng.uniform(0.05, 0.1), 3)}
        events.append(FaultEvent(kind=kind, at_shards=at, target=rng.randrange(1_000_000), **extra))
    return events


# --------------------------------------------------------------------------- stack


@dataclass
class ChaosStack:
    """The run's private servers and its workers (see the module docstring)."""

    tmp: Path
    redis: RedisServer
    triton: TritonServer
    triton_repo: Path
    proxy: FaultProxy
    moto_endpoint: str
    bucket: str
    stacks: list[Stack] = field(default_factory=list)
    reconcilers: list[subprocess.Popen] = field(default_factory=list)

    def worker_stack(self, name: str, **env: str) -> Stack:
        """A :class:`Stack` (key prefix and queue ``genimg-chaos-{name}``) whose workers use the proxy."""
        base = {
            "GENIMG_REDIS_URL": self.redis.url,
            "GENIMG_QUEUE": f"genimg-chaos-{name}",
            "GENIMG_KEY_PREFIX": f"genimg-chaos-{name}",
            "GENIMG_TRITON_URL": self.triton.urls["grpc"],
            "GENIMG_S3_ENDPOINT_URL": self.proxy.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **WORKER_ENV,
            **env,
        }
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        st = Stack(base, d)
        self.stacks.append(st)
        return st

    def client(self, st: Stack) -> Client:
        """A producer client of ``st``'s namespace; its S3 goes to moto directly (no faults)."""
        return Client(self.redis.url, queue=st.env["GENIMG_QUEUE"], key_prefix=st.env["GENIMG_KEY_PREFIX"],
                      storage=storage_settings_for(self.moto_endpoint))

    def store(self) -> S3Store:
        """The bucket through moto directly (for checks)."""
        return S3Store(storage_settings_for(self.moto_endpoint, s3_max_attempts=5), self.bucket)

    def start_reconcilers(self, st: Stack, n: int) -> list[subprocess.Popen]:
        """``n`` replicas of ``genimg reconcile`` on ``st``'s queue and key prefix; logs ``reconcile{i}.log``."""
        procs = []
        for i in range(n):
            env = {**os.environ, **st.env, "GENIMG_RECONCILE_PORT": "0"}
            with open(st.tmp / f"reconcile{i}.log", "ab") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "producer.cli", "reconcile"], env=env,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        self.reconcilers.extend(procs)
        return procs

    def start_workers(self, st: Stack, n: int) -> list[WorkerProc]:
        workers = [st.start_worker() for _ in range(n)]
        for w in workers:
            w.wait_ready(timeout_s=180)
        return workers

    def restart_triton(self) -> float:
        """SIGKILL tritonserver's process group, start it again on the same ports; seconds until READY."""
        t0 = time.monotonic()
        ports = dict(self.triton.ports)
        pid = self.triton.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.triton.stop(timeout_s=10)
        deadline = time.monotonic() + 60
        while True:  # the ports are ours again once the killed server's sockets are gone
            server = TritonServer(self.triton_repo, http_port=ports["http"], grpc_port=ports["grpc"],
                                  metrics_port=ports["metrics"], exit_timeout_s=5)
            server.start()
            try:
                server.wait_ready(timeout_s=300)
                break
            except Exception:
                in_use = "already in use" in server.log_tail()
                server.stop(timeout_s=10)
                if not in_use or time.monotonic() > deadline:
                    raise
        self.triton = server
        return time.monotonic() - t0

    def stop(self) -> None:
        """Stop every reconciler and worker (SIGTERM, then SIGKILL of its process group, orphans included)."""
        for proc in self.reconcilers:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for st in self.stacks:
            with contextlib.suppress(Exception):
                st.stop_all()
            for w in st.workers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(w.proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- driver


@dataclass
class InjectedFault:
    """A fault as it happened."""

    kind: str
    planned_at_shards: int
    t_s: float
    """Seconds since the chaos job was enqueued."""
    shards_done: int
    seconds: float
    """How long the injection took: Redis/Triton back, replacement worker ready, S3 window length."""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Heal:
    """A shard the reconciler re-enqueued (read from its log)."""

    t_s: float
    """Seconds since the chaos job was enqueued."""
    shard: int
    stranded_s: float
    """How long it had been stranded, as the reconciler measured it (from the first pass that saw it missing)."""
    replica: str


_HEAL_LINE = re.compile(r"^(\S+ \S+) WARNING workers\.reconcile re-enqueued stranded shard job=(\w+) "
                        r"shard=(\d+) stranded_s=([\d.]+)", re.M)


def read_heals(st: Stack, job_id: str, t0_wall: float) -> list[Heal]:
    """Every re-enqueue the reconcilers of ``st`` logged for ``job_id``, in time order."""
    heals = []
    for path in sorted(st.tmp.glob("reconcile*.log")):
        for stamp, job, shard, stranded in _HEAL_LINE.findall(path.read_text(errors="replace")):
            if job != job_id:
                continue
            at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            heals.append(Heal(round(at - t0_wall, 2), int(shard), float(stranded), path.stem))
    return sorted(heals, key=lambda h: h.t_s)


class ChaosDriver:
    """Injects a schedule's faults into a running job and plays the operator until the job is done."""

    def __init__(self, chaos: ChaosStack, st: Stack, client: Client, job_id: str, spec: JobSpec,
                 schedule: list[FaultEvent], seed: int) -> None:
        self.chaos, self.st, self.client, self.spec = chaos, st, client, spec
        self.job_id = job_id
        self.pending = list(schedule)
        self.keys = Keys(st.env["GENIMG_KEY_PREFIX"])
        self.queue = st.env["GENIMG_QUEUE"]
        self.injected: list[InjectedFault] = []
        self.stalls: list[dict[str, Any]] = []
        """Periods with the job unfinished and nothing queued or unacknowledged (healed by the reconciler)."""
        self.s3_rng = random.Random(seed * 7919 + 1)
        self._s3_window: tuple[float, InjectedFault, list] | None = None
        self._killed: set[int] = set()
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.stall_limit_s = stall_limit_s(st.env)

    def _r(self) -> redis.Redis:
        return redis.Redis.from_url(self.chaos.redis.url, socket_timeout=3, socket_connect_timeout=2)

    def _counts(self) -> jobs.JobCounts | None:
        r = self._r()
        try:
            return jobs.counts(r, self.keys, self.spec)
        except Exception:  # Redis restarting: progress unknown for now
            return None
        finally:
            r.close()

    def _backlog_total(self) -> int | None:
        r = self._r()
        try:
            return backlog(r, self.queue).total
        except Exception:
            return None
        finally:
            r.close()

    def _now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def _live_workers(self) -> list[WorkerProc]:
        return [w for w in self.st.workers if w.proc.poll() is None]

    # ---- faults

    def _inject(self, ev: FaultEvent, done: int) -> None:
        t, t_start = self._now(), time.monotonic()
        detail: dict[str, Any] = {}
        if ev.kind in ("kill_child", "kill_main"):
            live = self._live_workers()
            w = live[ev.target % len(live)]
            detail["worker"] = w.log_path.stem
            kids = w.children() or wait_for(w.children, 60, f"a pool child of {w.log_path.stem}")
            r = self._r()
            with contextlib.suppress(Exception):
                detail["shards_running"] = r.hlen(self.keys.job(self.job_id, "running"))
            r.close()
            if ev.kind == "kill_child":
                detail["pid"] = kids[0]
                os.kill(kids[0], signal.SIGKILL)
            else:
                detail["pid"], detail["orphaned_children"] = w.proc.pid, kids
                self._killed.add(w.proc.pid)
                os.kill(w.proc.pid, signal.SIGKILL)
                w.proc.wait(timeout=30)
                replacement = self.st.start_worker()
                replacement.wait_ready(timeout_s=180)
                detail["replacement"] = replacement.log_path.stem
        elif ev.kind == "restart_redis":
            detail["downtime_s"] = round(self.chaos.redis.restart(), 2)
        elif ev.kind == "restart_triton":
            detail["downtime_s"] = round(self.chaos.restart_triton(), 2)
        elif ev.kind == "s3_faults":
            rng = self.s3_rng

            def slow_down(_: RecordedRequest) -> bool:
                return rng.random() < ev.share_503

            def reset(_: RecordedRequest) -> bool:
                return rng.random() < ev.share_reset / max(1e-9, 1.0 - ev.share_503)

            rules = [self.chaos.proxy.fail(None, match=slow_down),
                     self.chaos.proxy.fail(None, action="reset", match=reset)]
            fault = InjectedFault(ev.kind, ev.at_shards, t, done, 0.0,
                                  {"share_503": ev.share_503, "share_reset": ev.share_reset})
            self._s3_window = (time.monotonic() + ev.duration_s, fault, rules)
            self._log(f"t={t:7.1f}s shards={done:5d} {ev.kind} for {ev.duration_s:g} s "
                      f"(503 {ev.share_503:.0%}, reset {ev.share_reset:.0%})")
            return
        fault = InjectedFault(ev.kind, ev.at_shards, t, done, round(time.monotonic() - t_start, 2), detail)
        self.injected.append(fault)
        self._log(f"t={t:7.1f}s shards={done:5d} {ev.kind} {detail} ({fault.seconds:.1f} s)")

    def _close_s3_window(self, force: bool = False) -> None:
        if self._s3_window is None:
            return
        end, fault, rules = self._s3_window
        if not force and time.monotonic() < end:
            return
        self.chaos.proxy.clear()
        fault.seconds = round(time.monotonic() - (self.t0 + fault.t_s), 2)
        requests = [q for q in self.chaos.proxy.requests]
        fault.detail.update(answered_503=rules[0].fired, connections_reset=rules[1].fired,
                            requests_seen=len(requests))
        self.injected.append(fault)
        self._s3_window = None
        self._log(f"t={self._now():7.1f}s s3_faults over: {fault.detail}")

    # ---- the loop

    def _log(self, line: str) -> None:
        print(f"[chaos] {line}", flush=True)

    def _check_workers(self) -> None:
        """Fail at once if a worker exited that the driver did not kill (it would never come back)."""
        for w in self.st.workers:
            if w.proc.pid in self._killed:
                continue
            if w.proc.poll() is not None or "Unrecoverable error" in w.log():
                raise AssertionError(f"worker {w.log_path.stem} died on its own (exit code {w.proc.poll()}) "
                                     f"after {self._now():.1f} s; log tail:\n{w.log()[-4000:]}")

    def run(self, timeout_s: float) -> float:
        """Inject every scheduled fault and watch the job until it has finished; never act as an operator.

        Returns:
            Seconds from :attr:`t0` until the job's done-shard count was complete.

        Raises:
            AssertionError: the job finished with a failed shard, stayed unfinished with nothing queued or
                unacknowledged for longer than :attr:`stall_limit_s` (the reconciler did not heal it), or
                was not finished within ``timeout_s``.
        """
        deadline = self.t0 + timeout_s
        empty_since: float | None = None
        while True:
            self._check_workers()
            self._close_s3_window()
            c = self._counts()
            done = c.shards_done if c is not None else None
            if self.pending and done is not None and done >= self.pending[0].at_shards and not c.finished:
                self._inject(self.pending.pop(0), done)
                empty_since = None
                continue
            if c is not None and c.finished:
                if c.state != "succeeded":
                    raise AssertionError(f"chaos job finished {c.state} with {c.shards_failed} failed shards "
                                         f"after {self._now():.1f} s: {self._failures()}")
                self._close_s3_window(force=True)
                self._end_stall(None)
                return time.monotonic() - self.t0
            if c is not None and self._backlog_total() == 0:
                if empty_since is None:
                    empty_since = time.monotonic()
                    self.stalls.append({"from_t_s": self._now(), "shards_done": c.shards_done})
                    self._log(f"t={self._now():7.1f}s unfinished at {c.shards_done}/{c.num_shards} with nothing "
                              "queued or unacknowledged: waiting for the reconciler")
                if time.monotonic() - empty_since > self.stall_limit_s:
                    raise AssertionError(f"chaos job stranded: unfinished at {c.shards_done}/{c.num_shards} with "
                                         f"nothing queued for {self.stall_limit_s:g} s; the reconciler did not heal "
                                         f"it (open shards {self._open_shards()})")
            elif empty_since is not None:
                empty_since = None
                self._end_stall(c)
            if time.monotonic() > deadline:
                raise AssertionError(f"chaos job not finished after {timeout_s:g} s: {c}")
            time.sleep(POLL_S)

    def _end_stall(self, c: jobs.JobCounts | None) -> None:
        if self.stalls and "to_t_s" not in self.stalls[-1]:
            self.stalls[-1]["to_t_s"] = self._now()
            self.stalls[-1]["seconds"] = round(self._now() - self.stalls[-1]["from_t_s"], 2)

    def _failures(self) -> dict[str, str]:
        r = self._r()
        try:
            return {k.decode(): v.decode()[:200] for k, v in r.hgetall(self.keys.job(self.job_id, "failed")).items()}
        except Exception:  # noqa: BLE001 - diagnostics only
            return {}
        finally:
            r.close()

    def _open_shards(self) -> list[int]:
        r = self._r()
        try:
            done = {int(k) for k in r.hkeys(self.keys.job(self.job_id, "done"))}
            failed = {int(k) for k in r.hkeys(self.keys.job(self.job_id, "failed"))}
            return [s for s in range(self.spec.shard_plan().num_shards) if s not in done | failed]
        except Exception:  # noqa: BLE001 - diagnostics only
            return []
        finally:
            r.close()


# --------------------------------------------------------------------------- the two runs


def run_undisturbed(chaos: ChaosStack, st: Stack, *, count: int, seed: int, shard_size: int,
                    timeout_s: float) -> tuple[JobSpec, float]:
    """Submit the job and wait for it with no fault; returns its spec and wall seconds (submit → finished)."""
    with chaos.client(st) as client:
        t0 = time.monotonic()
        job = client.submit(count=count, model="noise2img", upscale=False, image_format="png",
                            output=f"s3://{chaos.bucket}/clean", seed=seed, shard_size=shard_size,
                            sub_batch_size=25, name="chaos-reference")
        status = job.wait(progress=False, timeout_s=timeout_s, poll_s=0.25)
        wall = time.monotonic() - t0
        assert status.state == "succeeded", status
        return job.spec, wall


def start_chaos_copy(chaos: ChaosStack, client: Client, spec: JobSpec) -> JobSpec:
    """The same job (same id and spec) under ``s3://bucket/chaos``: its ``job.json`` stored, its shards enqueued.

    This is how a stored job is rerun elsewhere: put its spec, then ``resume``
    (every shard is uncommitted there, so every shard is enqueued). It starts
    the run; it is not an operator's recovery.
    """
    data = json.loads(spec.to_json())
    data["output"] = f"s3://{chaos.bucket}/chaos"
    copy = JobSpec.from_json(json.dumps(data))
    assert copy.job_id == spec.job_id
    store, layout = client.job_store(copy)
    store.put_bytes(f"{layout.job_prefix}/{SPEC_OBJECT}", copy.to_json().encode(), "application/json")
    sent = client.job(copy.job_id, output=copy.output).resume()
    assert sent == copy.shard_plan().num_shards
    return copy


# --------------------------------------------------------------------------- checks


def _tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = tf.getnames()
        assert len(names) == len(set(names)), "duplicate member names in a tar"
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]


def check_output(store: S3Store, reference: JobSpec, result: JobSpec) -> dict[str, Any]:
    """Compare the chaos job's output with the undisturbed one's; returns counts, raises on the first mismatch.

    Checks: the manifest has exactly the planned items, once each; the shard
    indexes hold each item once (no item in two shards, no duplicate key);
    every committed tar is byte-identical to the undisturbed run's; every image
    decodes and its sha256 equals the manifest's and the undisturbed run's;
    :func:`genimg.verify.verify_manifest` finds nothing; no multipart upload is
    left unfinished in the bucket.
    """
    ref = Layout.from_url(reference.output, reference.job_id)
    out = Layout.from_url(result.output, result.job_id)
    n, num_shards = result.total_items, result.shard_plan().num_shards

    manifest = read_manifest(store, out)
    assert manifest.num_rows == n, f"manifest has {manifest.num_rows} rows, planned {n}"
    assert manifest.column("item_index").to_pylist() == list(range(n))
    keys = manifest.column("key").to_pylist()
    assert len(set(keys)) == n, "duplicate keys in the manifest"
    assert set(manifest.column("status").to_pylist()) == {STATUS_OK}

    shards = committed_shards(store, out)
    assert shards == list(range(num_shards)), f"committed shards {len(shards)} of {num_shards}"
    index_rows = sum(read_shard_index(store, out, s).num_rows for s in shards)
    assert index_rows == n, f"shard indexes hold {index_rows} rows for {n} items (an item in two shards?)"

    ref_manifest = read_manifest(store, ref)
    ref_sha = dict(zip(ref_manifest.column("item_index").to_pylist(), ref_manifest.column("sha256").to_pylist()))
    row_sha = dict(zip(manifest.column("item_index").to_pylist(), manifest.column("sha256").to_pylist()))
    assert row_sha == ref_sha, "per-item sha256 differs from the undisturbed run"

    tar_bytes = 0
    decoded = 0
    for s in shards:
        got, want = store.get_bytes(out.tar_key(s)), store.get_bytes(ref.tar_key(s))
        assert got == want, f"shard {s}: tar differs from the undisturbed run ({len(got)} vs {len(want)} bytes)"
        tar_bytes += len(got)
        for name, data in _tar_members(got).items():
            if name.endswith(".png"):
                index = int(name.split(".")[0])
                assert sha256_hex(data) == row_sha[index], f"item {index}: sha256 differs from the manifest"
                arr = decode(data)
                assert arr.shape == (28, 28, 1), f"item {index}: decoded shape {arr.shape}"
                decoded += 1
    assert decoded == n, f"{decoded} images in the tars, planned {n}"

    report = verify_manifest(store, out, ranged=False)
    assert report.ok and report.checked == n, report.problems[:5]
    uploads = store.list_multipart_uploads("")
    assert not uploads, f"unfinished multipart uploads left: {[u.key for u in uploads][:5]}"
    return {"items": n, "shards": num_shards, "images_decoded": decoded, "tar_bytes": tar_bytes,
            "verify_manifest_checked": report.checked, "multipart_uploads_left": len(uploads)}


def read_manifest(store: S3Store, layout: Layout):
    """Every written manifest part, concatenated (the job's whole manifest once it is finalised)."""
    from genimg.manifest import read_table

    return read_table(store, layout)


def prometheus_totals(metrics_dirs: list[Path]) -> dict[str, float]:
    """Counter totals over the multiprocess directories of every worker ever started (killed ones included).

    A worker process writes each counter to a memory-mapped file in its
    directory as it counts; a SIGKILL loses nothing already written, so the
    directories of dead workers still hold their counts.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    totals: dict[str, float] = {}
    for d in metrics_dirs:
        if not d.is_dir():
            continue
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(d))
        for metric in registry.collect():
            for sample in metric.samples:
                if sample.name in ("genimg_images_written_total", "genimg_shards_committed_total",
                                   "genimg_items_failed_total"):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def write_report(report: dict[str, Any]) -> str:
    """Print the report and write it as JSON to ``GENIMG_CHAOS_REPORT`` (``{seed}`` in the path is filled in)."""
    text = json.dumps(report, indent=2, sort_keys=False, default=str)
    print("\n[chaos] report:\n" + text, flush=True)
    path = os.environ.get("GENIMG_CHAOS_REPORT")
    if path:
        p = Path(path.replace("{seed}", str(report["seed"])))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
    return text


def as_dicts(items: list) -> list[dict[str, Any]]:
    return [asdict(x) for x in items]
