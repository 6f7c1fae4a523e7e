"""genimg against its upper bound and against what users would build instead, in one run (issue 9).

Same models (the cpu flavour's ONNX files), same job (txt2img, upscaled to
112 x 112, PNG, ``--images`` items: ``--images-per-prompt`` images of each of
``images / images_per_prompt`` prompts, noise from genimg's seeds), same CPU
budget (every process pinned to the same CPUs, the first two, and each
system limited to the same number of model threads; see ``budget`` in the
JSON), images/s from the first submit to the last image committed in storage:

* ``upper_bound``: the ONNX models in one Python process (``upper_bound.py``),
  best batch size and thread split from a small sweep, PNGs to a local folder;
* ``genimg_default``: producer → Redis → ``genimg worker`` → Triton → moto S3
  with the defaults (``genimg local up``: 2 worker processes; JobSpec's shard
  and sub-batch sizes; the default Triton repository);
* ``genimg_best``: the same path with the best settings of a small sweep
  (shard size, sub-batch size, worker processes, Triton instances, dynamic
  batching delay), one setting at a time starting from the defaults;
* ``naive_celery``: one Celery task per image (``naive_celery.py``);
* ``ray_data``: Ray Data ``map_batches`` with an actor pool (``ray_data.py``,
  in its own venv ``.cache/bench/ray-venv``, installed on first use);
* ``triton_view``: Triton's own view of ``txt2img`` at concurrency 1..8
  (``triton_view.py``; perf_analyzer's measurement without its binary).

Each system runs ``--rounds`` times, interleaved (the order rotates each
round); medians are reported. Output: ``--out`` (JSON), a PNG chart next to
it, and a Markdown table (``.md``) for ``benchmarks/README.md``.

Usage::

    python benchmarks/bench.py                     # full run: ~16 min on 2 cores (+ up to 5 min waiting for load)
    python benchmarks/bench.py --quick --out /tmp/q.json   # smoke test, ~1 min
    make bench
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import _infra  # noqa: E402
from benchmarks._infra import BENCH_DIR, ROOT, THREAD_ENV, Sampler  # noqa: E402

log = logging.getLogger("bench")

SYSTEMS = ("upper_bound", "genimg_default", "genimg_best", "naive_celery", "ray_data")
BUCKET = "genimg-bench"
SEED = 1234
RAY_VENV = ROOT / ".cache" / "bench" / "ray-venv"
RAY_PACKAGES = ("ray[data]", "onnxruntime", "tokenizers", "pillow", "boto3", "psutil")
DEFAULTS = {"shard_size": 1000, "sub_batch_size": 64, "workers": 2, "infer_inflight": 2, "instances": 1,
            "queue_delay_us": 2000}
"""genimg's defaults: JobSpec (shard 1,000, sub-batch 64), ``genimg local up`` (2 workers), WorkerSettings
(2 requests in flight per worker), repo.py (1 instance, 2,000 us)."""
SWEEP = {"shard_size": (100, 250, 500), "sub_batch_size": (32, 128, 256), "workers": (1, 3),
         "infer_inflight": (4,), "instances": (2,), "queue_delay_us": (0, 10000)}
"""Values tried per setting, one setting at a time, keeping the best so far (the default is measured first)."""
UPPER_SWEEP = [(b, t, i) for b in (16, 64, 256) for t, i in ((2, 1), (1, 2))]
"""(batch, threads, intra-op threads) of the upper bound."""
RAY_SWEEP = ("64x2", "256x2")
"""Ray Data (batch x actors) tried before the rounds."""


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 6) if xs else None


def _pcts(samples: list[float]) -> dict:
    s = sorted(samples)
    if not s:
        return {"p50": None, "p95": None, "n": 0}
    return {"p50": round(s[len(s) // 2], 5), "p95": round(s[min(len(s) - 1, int(0.95 * len(s)))], 5), "n": len(s)}


@dataclass
class TritonHandle:
    key: tuple[int, int]
    server: object
    repo: Path

    @property
    def grpc(self) -> str:
        return self.server.urls["grpc"]  # type: ignore[attr-defined]


@dataclass
class WorkerSet:
    key: tuple
    queue: str
    prefix: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)


class Bench:
    """Servers, worker sets and timed runs of one benchmark invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="run-", dir=_cache_dir()))
        self.env = {**os.environ, **THREAD_ENV}
        self.tritons: dict[tuple[int, int], TritonHandle] = {}
        self.workers: dict[tuple, WorkerSet] = {}
        self.naive: subprocess.Popen | None = None
        self.naive_queue = f"naive-{uuid.uuid4().hex[:8]}"
        self.servers: list[_infra.Server] = []
        self.run_no = 0

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        from genimg.models.text_encoder import package_model_dir
        from genimg.triton.repo import ensure_onnx

        a = self.args
        self.onnx_dir = ensure_onnx().resolve()
        self.tokenizer = package_model_dir() / "tokenizer.json"
        self.ipp = a.images_per_prompt
        n_prompts = -(-a.images // self.ipp)
        self.count = n_prompts * self.ipp
        self.prompts_file = self.tmp / "prompts.txt"
        digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        self.prompts_file.write_text("\n".join(
            f"a handwritten {d if k % 2 else digits[d]}, style {k}" for k, d in
            ((k, k % 10) for k in range(n_prompts))) + "\n", encoding="utf-8")
        self.redis = _infra.start_redis(self.tmp)
        self.moto = _infra.start_moto(self.tmp)
        self.servers += [self.redis, self.moto]
        self.env.update(_infra.s3_env(self.moto.url))
        self.env["GENIMG_REDIS_URL"] = self.redis.url
        _infra.s3_client(self.moto.url).create_bucket(Bucket=BUCKET)

    def triton(self, instances: int, delay_us: int) -> TritonHandle:
        key = (instances, delay_us)
        if key not in self.tritons:
            from genimg.triton.repo import build_repository
            from genimg.triton.server import TritonServer

            repo = build_repository(self.tmp / f"repo-i{instances}-d{delay_us}", "cpu", self.onnx_dir,
                                    instances=instances, queue_delay_us=delay_us, intra_op_threads=1)
            server = TritonServer(repo, work_dir=self.tmp / f"triton-i{instances}-d{delay_us}")
            old = dict(os.environ)
            os.environ.update(THREAD_ENV)
            try:
                server.start()
            finally:
                os.environ.clear()
                os.environ.update(old)
            server.wait_ready(timeout_s=600)
            self.tritons[key] = TritonHandle(key, server, repo)
            log.info("triton instances=%d delay=%dus ready at %s", instances, delay_us, server.urls["grpc"])
        return self.tritons[key]

    def stop_triton(self, key: tuple[int, int]) -> None:
        h = self.tritons.pop(key, None)
        if h is not None:
            h.server.stop()  # type: ignore[attr-defined]

    def worker_set(self, instances: int, delay_us: int, n: int, inflight: int = 2) -> WorkerSet:
        key = (instances, delay_us, n, inflight)
        if key in self.workers:
            return self.workers[key]
        tri = self.triton(instances, delay_us)
        tag = uuid.uuid4().hex[:8]
        ws = WorkerSet(key, f"bench-{tag}", f"bench-{tag}")
        env = {**self.env, "GENIMG_QUEUE": ws.queue, "GENIMG_KEY_PREFIX": ws.prefix, "GENIMG_TRITON_URL": tri.grpc,
               "GENIMG_CONCURRENCY": "1", "GENIMG_INFER_INFLIGHT": str(inflight), "GENIMG_METRICS_PORT": "0",
               "GENIMG_LOG_LEVEL": "WARNING"}
        for k in range(n):
            lg = self.tmp / f"worker-{tag}-{k}.log"
            ws.logs.append(lg)
            with open(lg, "ab") as f:
                ws.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "producer.cli", "--log-level", "INFO", "worker", "--hostname",
                     f"w{k}-{tag}@bench"], env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                    start_new_session=True))
        deadline = time.monotonic() + 180
        for p, lg in zip(ws.procs, ws.logs):
            while " ready." not in lg.read_text(errors="replace"):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start: {lg.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)  # poll interval while the worker starts
        self.workers[key] = ws
        self._genimg_job(ws, count=8 * n * 4, shard_size=8, sub_batch_size=8, warm=True)  # clients, imports
        return ws

    def stop_workers(self, key: tuple) -> None:
        ws = self.workers.pop(key, None)
        if ws is not None:
            for p in ws.procs:
                _infra.stop(p, timeout_s=30)

    def naive_workers(self) -> subprocess.Popen:
        if self.naive is None:
            tri = self.triton(DEFAULTS["instances"], DEFAULTS["queue_delay_us"])
            env = {**self.env, "NAIVE_BROKER_URL": self.redis.url, "NAIVE_TRITON_URL": tri.grpc,
                   "NAIVE_S3_ENDPOINT": self.moto.url, "NAIVE_QUEUE": self.naive_queue}
            lg = self.tmp / "naive.log"
            with open(lg, "ab") as f:
                self.naive = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "naive_celery", "worker", "--concurrency",
                     str(self.args.cpus_n), "-Q", self.naive_queue, "--loglevel", "INFO", "-n",
                     f"naive-{uuid.uuid4().hex[:6]}@bench", "--without-gossip", "--without-mingle"],
                    env=env, cwd=BENCH_DIR, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 120
            while " ready." not in lg.read_text(errors="replace"):
                if self.naive.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"naive worker did not start: {lg.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)  # poll interval while the worker starts
            self._naive_job(count=20, warm=True)
        return self.naive

    # ---------------------------------------------------------------- children
    def _child(self, cmd: list[str], env: dict[str, str], sampler: Sampler | None, timeout_s: float,
               cwd: Path = ROOT) -> dict:
        out_path = self.tmp / f"child-{uuid.uuid4().hex[:8]}.out"
        with open(out_path, "wb") as out:
            p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
            if sampler is not None:
                sampler.add_root(p.pid)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        text = out_path.read_text(errors="replace")
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    break
        raise RuntimeError(f"{Path(cmd[1]).name if len(cmd) > 1 else cmd} failed (exit {p.returncode}):\n"
                           f"{text[-3000:]}")

    def _genimg_job(self, ws: WorkerSet, *, count: int | None = None, shard_size: int, sub_batch_size: int,
                    warm: bool = False, sampler: Sampler | None = None) -> dict:
        self.run_no += 1
        prefix = f"genimg/{self.run_no:04d}"
        prompts, ipp = self.prompts_file, self.ipp
        if count is not None:  # a warm-up job: ``count`` items, 8 per prompt
            prompts = self.tmp / "warm.txt"
            prompts.write_text("\n".join(f"warm {i}" for i in range(-(-count // 8))) + "\n")
            ipp = 8
        env = {**self.env, "GENIMG_QUEUE": ws.queue, "GENIMG_KEY_PREFIX": ws.prefix}
        cmd = [sys.executable, str(BENCH_DIR / "genimg_run.py"), "--prompts", str(prompts), "--images-per-prompt",
               str(ipp), "--seed", str(SEED), "--output", f"s3://{BUCKET}/{prefix}", "--shard-size", str(shard_size),
               "--sub-batch-size", str(sub_batch_size)]
        try:
            return self._child(cmd, env, sampler, timeout_s=900)
        finally:
            if warm:
                _infra.empty_prefix(self.moto.url, BUCKET, prefix + "/")

    def _naive_job(self, *, count: int, warm: bool = False, sampler: Sampler | None = None) -> dict:
        self.run_no += 1
        prefix = f"naive/{self.run_no:04d}"
        env = {**self.env, "NAIVE_BROKER_URL": self.redis.url, "NAIVE_QUEUE": self.naive_queue}
        cmd = [sys.executable, str(BENCH_DIR / "naive_celery.py"), "--prompts", str(self.prompts_file),
               "--images-per-prompt", str(self.ipp), "--count", str(count), "--seed", str(SEED), "--bucket", BUCKET,
               "--prefix", prefix]
        try:
            res = self._child(cmd, env, sampler, timeout_s=3600, cwd=BENCH_DIR)
            res["objects"], res["bytes"] = _infra.count_objects(self.moto.url, BUCKET, prefix + "/")
            return res
        finally:
            if warm:
                _infra.empty_prefix(self.moto.url, BUCKET, prefix + "/")

    # ---------------------------------------------------------------- systems
    def measure(self, system: str, roots: list[int], fn, driver_kind: str) -> dict:
        """Run ``fn(sampler)`` under a :class:`Sampler` of ``roots``; adds CPU, RSS and load figures.

        The driver child's CPU before its clock started (imports, sessions, Ray's start-up:
        ``setup_cpu_s`` in its report) is taken off the total and off ``driver_kind``.
        """
        load0 = os.getloadavg()[0]
        busy0 = _infra.host_busy_s()
        t0 = time.perf_counter()
        with Sampler(list(roots)) as sampler:
            res = fn(sampler)
        wall = time.perf_counter() - t0
        busy = _infra.host_busy_s() - busy0
        rep = sampler.report()
        setup = float(res.get("setup_cpu_s", 0.0))
        ours = max(0.0, rep["cpu_s"] - setup)
        if driver_kind in rep["cpu_s_by_kind"]:
            rep["cpu_s_by_kind"][driver_kind] = round(max(0.0, rep["cpu_s_by_kind"][driver_kind] - setup), 3)
        res.update(rep)
        res["cpu_s"] = round(ours, 3)
        res["cpu_s_per_image"] = round(ours / res["images"], 6)
        res["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        res["host_busy_share_other"] = round(max(0.0, busy - rep["cpu_s"]) / (wall * len(self.args.cpus)), 3)
        res.pop("job_id", None)
        log.info("%-15s %8.1f images/s  %.2f s  cpu %.2f ms/image  load %.2f", system, res["images_per_s"],
                 res["seconds"], 1000 * res["cpu_s_per_image"], load0)
        return res

    def _base_roots(self, tri: TritonHandle | None) -> list[int]:
        roots = [self.redis.proc.pid, self.moto.proc.pid]
        if tri is not None:
            roots.append(tri.server.pid)  # type: ignore[attr-defined]
        return roots

    def run_upper(self, batch: int, threads: int, intra: int, count: int) -> dict:
        out_dir = self.tmp / "upper-out"
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [sys.executable, str(BENCH_DIR / "upper_bound.py"), "--onnx-dir", str(self.onnx_dir), "--prompts",
               str(self.prompts_file), "--images-per-prompt", str(self.ipp), "--count", str(count), "--seed",
               str(SEED), "--batch", str(batch), "--threads", str(threads), "--intra-op", str(intra),
               "--out-dir", str(out_dir)]
        try:
            return self.measure("upper_bound", [], lambda s: self._child(cmd, self.env, s, timeout_s=900),
                                "upper_bound")
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    def run_genimg(self, cfg: dict, name: str = "genimg", count: int | None = None) -> dict:
        ws = self.worker_set(cfg["instances"], cfg["queue_delay_us"], cfg["workers"], cfg["infer_inflight"])
        tri = self.tritons[(cfg["instances"], cfg["queue_delay_us"])]
        roots = self._base_roots(tri) + [p.pid for p in ws.procs]
        prompts = self.prompts_file
        if count is not None and count != self.count:
            prompts = self.tmp / f"prompts-{count}.txt"
            lines = self.prompts_file.read_text().splitlines()
            prompts.write_text("\n".join(lines[:-(-count // self.ipp)]) + "\n")
        run = self.run_no + 1
        res = self.measure(name, roots, lambda s: self._genimg_job_from(ws, prompts, cfg, s), "genimg_producer")
        res["config"] = dict(cfg)
        _infra.empty_prefix(self.moto.url, BUCKET, f"genimg/{run:04d}/")
        return res

    def _genimg_job_from(self, ws: WorkerSet, prompts: Path, cfg: dict, sampler: Sampler) -> dict:
        saved, self.prompts_file = self.prompts_file, prompts
        try:
            return self._genimg_job(ws, shard_size=cfg["shard_size"], sub_batch_size=cfg["sub_batch_size"],
                                    sampler=sampler)
        finally:
            self.prompts_file = saved

    def run_naive(self) -> dict:
        naive = self.naive_workers()
        tri = self.tritons[(DEFAULTS["instances"], DEFAULTS["queue_delay_us"])]
        run = self.run_no + 1
        res = self.measure("naive_celery", self._base_roots(tri) + [naive.pid],
                           lambda s: self._naive_job(count=self.count, sampler=s), "naive_producer")
        res["config"] = {"concurrency": self.args.cpus_n, "triton": "default repository"}
        _infra.empty_prefix(self.moto.url, BUCKET, f"naive/{run:04d}/")
        return res

    def ray_python(self) -> Path:
        py = RAY_VENV / "bin" / "python"
        if not py.is_file() or subprocess.run([str(py), "-c", "import ray.data, onnxruntime, tokenizers, PIL, boto3, "
                                               "psutil"], capture_output=True).returncode:
            log.info("installing Ray into %s (first use)", RAY_VENV)
            subprocess.run([sys.executable, "-m", "venv", str(RAY_VENV)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", *RAY_PACKAGES], check=True)
        return py

    def run_ray(self, configs: str, count: int | None = None) -> dict:
        py = self.ray_python()
        self.run_no += 1
        prefix = f"ray/{self.run_no:04d}"
        env = {**self.env, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("PYTHONPATH", None)
        cmd = [str(py), str(BENCH_DIR / "ray_data.py"), "--onnx-dir", str(self.onnx_dir), "--tokenizer",
               str(self.tokenizer), "--prompts", str(self.prompts_file), "--images-per-prompt", str(self.ipp),
               "--count", str(count or self.count), "--seed", str(SEED), "--endpoint", self.moto.url,
               "--bucket", BUCKET, "--prefix", prefix, "--configs", configs, "--num-cpus", str(self.args.cpus_n)]

        def go(sampler: Sampler) -> dict:
            out = self._child(cmd, env, sampler, timeout_s=900)
            runs = out["runs"]
            first = dict(runs[0])
            first.update(ray_version=out["ray_version"], init_s=out["init_s"], setup_cpu_s=out["setup_cpu_s"],
                         all_runs=runs if len(runs) > 1 else None)
            return first

        res = self.measure("ray_data", [self.moto.proc.pid], go, "ray_system")
        _infra.empty_prefix(self.moto.url, BUCKET, prefix + "/")
        return res

    def run_triton_view(self) -> dict:
        tri = self.triton(DEFAULTS["instances"], DEFAULTS["queue_delay_us"])
        q = self.args.quick
        metrics = tri.server.urls["metrics"]  # type: ignore[attr-defined]
        cmd = [sys.executable, str(BENCH_DIR / "triton_view.py"), "--grpc", tri.grpc, "--metrics", metrics,
               "--concurrency", "1,2" if q else "1,2,3,4,5,6,7,8",
               "--batch", "1" if q else "1,64", "--seconds", "1" if q else "2.5"]
        return self._child(cmd, self.env, None, timeout_s=600)

    def close(self) -> None:
        for key in list(self.workers):
            self.stop_workers(key)
        if self.naive is not None:
            _infra.stop(self.naive, timeout_s=30)
        for key in list(self.tritons):
            self.stop_triton(key)
        for s in self.servers:
            _infra.stop(s.proc)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _cache_dir() -> Path:
    d = ROOT / ".cache" / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _score(run: dict) -> float:
    """A sweep run's images/s per share of the machine that others left free (others' load varies)."""
    return run["images_per_s"] / max(0.3, 1.0 - run["host_busy_share_other"])


SWEEP_MARGIN = 1.03
"""A swept value replaces the best so far only if it scores this much better (runs are single and noisy)."""
SWEEP_RERUN_OTHER_SHARE = 0.2
"""A sweep run during which others used more than this share of the CPUs is run once more (the quieter counts):
the load correction of :func:`_score` is rough, and a disturbed run once won a sweep by it."""


def _quieter(run: dict, again: Callable[[], dict]) -> dict:
    """``run``, or a second run of the same setting if others disturbed the first (see above)."""
    if run["host_busy_share_other"] <= SWEEP_RERUN_OTHER_SHARE:
        return run
    second = again()
    return second if second["host_busy_share_other"] < run["host_busy_share_other"] else run


def _wait_for_load(limit: float, max_wait_s: float) -> dict:
    t0 = time.monotonic()
    first = os.getloadavg()[0]
    while os.getloadavg()[0] > limit and time.monotonic() - t0 < max_wait_s:
        log.info("load average %.2f > %.2f: waiting (%.0f s so far)", os.getloadavg()[0], limit, time.monotonic() - t0)
        time.sleep(15)  # poll the load average
    return {"limit": limit, "at_first_check": round(first, 2), "waited_s": round(time.monotonic() - t0, 1),
            "at_start": round(os.getloadavg()[0], 2)}


def summarize(runs: list[dict]) -> dict:
    """Medians over rounds, pooled stage percentiles, peak RSS per kind over rounds."""
    out: dict = {"rounds": len(runs)}
    for k in ("images_per_s", "seconds", "cpu_s_per_image", "host_busy_share_other"):
        out[k] = _median([r.get(k) for r in runs])
    out["images_per_s_all"] = [r["images_per_s"] for r in runs]
    if runs and all(r.get("actor_ready_s") is not None for r in runs):  # Ray: also without the pool's start-up
        out["steady_images_per_s"] = _median([r["images"] / (r["seconds"] - r["actor_ready_s"]) for r in runs])
        out["actor_ready_s"] = _median([r["actor_ready_s"] for r in runs])
    stages: dict[str, list[float]] = {}
    for r in runs:
        for k, v in (r.get("stage_samples") or {}).items():
            stages.setdefault(k, []).extend(v)
    out["stage_seconds"] = {k: _pcts(v) for k, v in stages.items()}
    out["stage_unit"] = runs[0].get("stage_unit") if runs else None
    rss: dict[str, dict] = {}
    for r in runs:
        for kind, v in (r.get("peak_rss_mib") or {}).items():
            cur = rss.setdefault(kind, {"process": 0.0, "total": 0.0, "processes": 0})
            cur["process"] = max(cur["process"], v["process"])
            cur["total"] = max(cur["total"], v["total"])
            cur["processes"] = max(cur["processes"], v["processes"])
    out["peak_rss_mib"] = rss
    cpu_kind: dict[str, list[float]] = {}
    for r in runs:
        for kind, v in (r.get("cpu_s_by_kind") or {}).items():
            cpu_kind.setdefault(kind, []).append(v / r["images"])
    out["cpu_s_per_image_by_kind"] = {k: _median(v) for k, v in cpu_kind.items()}
    out["loadavg_1m"] = [r["loadavg_1m"] for r in runs]
    if runs and runs[0].get("config"):
        out["config"] = runs[0]["config"]
    return out


TARGETS = {"genimg_best/upper_bound": 0.85, "genimg_best/naive_celery": 10.0, "genimg_best/ray_data": 1.0}
"""Issue 9's targets for genimg (best settings) against each system."""


def add_ratios(result: dict) -> None:
    """``result["ratios"]`` and ``result["targets"]`` from the systems' median images/s.

    ``genimg_*/ray_data_steady`` compares with Ray's rate after its actor pool is ready
    (``steady_images_per_s``), i.e. without the pool's start-up that each Ray Data job pays.
    """
    ips = {k: v.get("images_per_s") for k, v in result["systems"].items()}
    ips["ray_data_steady"] = result["systems"].get("ray_data", {}).get("steady_images_per_s")

    def ratio(a: str, b: str) -> float | None:
        return round(ips[a] / ips[b], 3) if ips.get(a) and ips.get(b) else None

    result["ratios"] = {f"{g}/{b}": ratio(g, b) for g in ("genimg_best", "genimg_default")
                        for b in ("upper_bound", "naive_celery", "ray_data", "ray_data_steady")}
    result["ratios"]["upper_bound/naive_celery"] = ratio("upper_bound", "naive_celery")
    result["targets"] = {k: {"target": t, "met": bool(result["ratios"][k] is not None and result["ratios"][k] >= t)}
                         for k, t in TARGETS.items()}


def write_outputs(result: dict, out: Path) -> None:
    """The JSON, its chart (``.png``) and Markdown table (``.md``) next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result["chart"] = str(out.with_suffix(".png"))
    chart(result, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result))
    out.write_text(json.dumps(result, indent=1))


def _strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("stage_samples", "all_runs")}


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in SYSTEMS if result["systems"].get(s, {}).get("images_per_s")]
    vals = [result["systems"][s]["images_per_s"] for s in names]
    lo = [v - min(result["systems"][s]["images_per_s_all"]) for s, v in zip(names, vals)]
    hi = [max(result["systems"][s]["images_per_s_all"]) - v for s, v in zip(names, vals)]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    colors = ["#888888" if s == "upper_bound" else "#2a7ab9" if s.startswith("genimg") else "#d98c2b" for s in names]
    bars = ax.bar(names, vals, yerr=[lo, hi], capsize=4, color=colors)
    for name, b, v in zip(names, bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v / 2, f"{v:.0f}", ha="center", va="center", fontsize=10,
                color="white", fontweight="bold")
        steady = result["systems"][name].get("steady_images_per_s")
        if steady:
            ax.plot([b.get_x(), b.get_x() + b.get_width()], [steady, steady], "k--", lw=1)
            ax.text(b.get_x() + b.get_width() / 2, steady, f"after actor start {steady:.0f}", ha="center",
                    va="bottom", fontsize=7)
    m = result["machine"]
    ax.set_ylabel("images/s (median, min-max bars)")
    ax.set_title(f"txt2img 112px PNG, {result['settings']['images']} images, {len(result['budget']['cpus'])} CPUs "
                 f"({m['cpu_model'][:40]})", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(result: dict) -> str:
    s, r = result["systems"], result["ratios"]
    lines = ["| system | images/s (median) | runs | CPU ms/image | p50 infer s (unit) | peak RSS MiB (largest kinds) |",
             "| --- | ---: | --- | ---: | --- | --- |"]
    for name in SYSTEMS:
        v = s.get(name) or {}
        if not v.get("images_per_s"):
            lines.append(f"| {name} | skipped | | | | {v.get('skipped', '')} |")
            continue
        inf = v["stage_seconds"].get("infer", {}).get("p50")
        rss = sorted(v["peak_rss_mib"].items(), key=lambda kv: -kv[1]["total"])[:3]
        rss_s = ", ".join(f"{k} {x['total']:.0f}" for k, x in rss)
        lines.append(f"| {name} | {v['images_per_s']:.1f} | {', '.join(f'{x:.0f}' for x in v['images_per_s_all'])} "
                     f"| {1000 * v['cpu_s_per_image']:.2f} | {inf} ({v['stage_unit']}) | {rss_s} |")
    lines.append("")
    lines.append("| ratio | value | target |")
    lines.append("| --- | ---: | ---: |")
    for k, t in result["targets"].items():
        value = r.get(k) if r.get(k) is not None else "n/a"
        lines.append(f"| {k} | {value} | {t['target']} ({'met' if t['met'] else 'missed'}) |")
    for k, v in r.items():
        if k not in result["targets"]:
            lines.append(f"| {k} | {v} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "latest.json"))
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--images-per-prompt", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sweep-images", type=int, default=2000, help="images per sweep run")
    ap.add_argument("--quick", action="store_true", help="smoke test: 160 images, 1 round, no sweep, no Ray")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="genimg_best = --best settings")
    ap.add_argument("--best", default="", help="genimg_best settings without a sweep, e.g. shard_size=250,workers=2")
    ap.add_argument("--cpus", default="", help="CPU ids to pin to (default: the first two)")
    ap.add_argument("--wait-load", type=float, default=2.5, help="wait until the 1-min load average is below this")
    ap.add_argument("--wait-load-max-s", type=float, default=300,
                    help="longest wait for --wait-load (then it runs anyway; the JSON records the load)")
    ap.add_argument("--keep", action="store_true", help="keep the run's temp directory (logs)")
    ap.add_argument("--refresh", action="store_true",
                    help="measure nothing: recompute medians of the runs in --out, ratios, chart and table")
    args = ap.parse_args(argv)
    if args.refresh:
        result = json.loads(Path(args.out).read_text())
        for name, s in result["systems"].items():
            if s.get("runs"):
                s.update({k: v for k, v in summarize(s["runs"]).items() if k not in ("stage_seconds", "stage_unit")})
        add_ratios(result)
        write_outputs(result, Path(args.out))
        print(markdown(result))
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("genimg", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quick:
        args.images, args.images_per_prompt, args.rounds, args.no_ray, args.no_sweep = 160, 8, 1, True, True
        args.best = args.best or "shard_size=40,sub_batch_size=20"
        args.wait_load_max_s = 0
    args.cpus = _infra.pin_cpus([int(c) for c in args.cpus.split(",")] if args.cpus else None)
    args.cpus_n = len(args.cpus)
    load = _wait_for_load(args.wait_load, args.wait_load_max_s)
    t_start = time.perf_counter()
    bench = Bench(args)
    result: dict = {"schema": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": _infra.machine(),
                    "load_wait": load}
    try:
        bench.setup()
        result["settings"] = {"images": bench.count, "images_per_prompt": bench.ipp,
                              "prompts": bench.count // bench.ipp,
                              "model": "txt2img", "upscale": True, "image_size": 112, "format": "png",
                              "png_compress_level": 6, "seed": SEED, "rounds": args.rounds, "quick": args.quick,
                              "sweep_images": min(args.sweep_images, bench.count)}
        result["budget"] = {
            "cpus": args.cpus,
            "how": "the benchmark process pins itself to these CPUs (sched_setaffinity) before starting anything, "
                   "so every server, worker, actor and child inherits the mask; OMP/MKL/OpenBLAS pools are 1 "
                   "thread and TOKENIZERS_PARALLELISM=false everywhere; model compute threads: upper bound "
                   "threads x intra-op <= CPUs, Triton one ONNX Runtime intra-op thread per model instance, "
                   f"naive Celery --concurrency {args.cpus_n}, Ray num_cpus={args.cpus_n} with 1 CPU and 1 "
                   "intra-op thread per actor"}
        sweeps: dict = {}
        n_sweep = min(args.sweep_images, bench.count)

        # ---- sweeps (single runs, --sweep-images each)
        if args.no_sweep:
            best_upper = (64, 2, 1)
            best = dict(DEFAULTS)
            for kv in filter(None, args.best.split(",")):
                k, v = kv.split("=")
                best[k] = int(v)
        else:
            rows = []
            for b, t, i in UPPER_SWEEP:
                r = _quieter(bench.run_upper(b, t, i, n_sweep), lambda b=b, t=t, i=i: bench.run_upper(b, t, i, n_sweep))
                rows.append({"batch": b, "threads": t, "intra_op": i, "images_per_s": r["images_per_s"],
                             "host_busy_share_other": r["host_busy_share_other"], "score": round(_score(r), 2)})
            best_row = max(rows, key=lambda x: x["score"])
            best_upper = (best_row["batch"], best_row["threads"], best_row["intra_op"])
            sweeps["upper_bound"] = rows
            best, grows = dict(DEFAULTS), []
            r = _quieter(bench.run_genimg(best, "genimg_sweep", count=n_sweep),
                         lambda: bench.run_genimg(DEFAULTS, "genimg_sweep", count=n_sweep))
            best_score = _score(r)
            grows.append({**best, "images_per_s": r["images_per_s"],
                          "host_busy_share_other": r["host_busy_share_other"], "score": round(best_score, 2)})
            for setting, values in SWEEP.items():
                cand, cand_score = best, best_score
                for v in values:
                    cfg = {**best, setting: v}
                    try:
                        r = _quieter(bench.run_genimg(cfg, "genimg_sweep", count=n_sweep),
                                     lambda cfg=cfg: bench.run_genimg(cfg, "genimg_sweep", count=n_sweep))
                    except RuntimeError as e:
                        log.warning("sweep %s failed: %s", cfg, e)
                        continue
                    score = _score(r)
                    grows.append({**cfg, "images_per_s": r["images_per_s"],
                                  "host_busy_share_other": r["host_busy_share_other"], "score": round(score, 2)})
                    if score > cand_score and score > best_score * SWEEP_MARGIN:
                        cand, cand_score = cfg, score
                best, best_score = cand, cand_score
                keep = {tuple(c[k] for k in ("instances", "queue_delay_us", "workers", "infer_inflight"))
                        for c in (best, DEFAULTS)}
                for key in [k for k in bench.workers if k not in keep]:
                    bench.stop_workers(key)
                for key in [k for k in bench.tritons if k not in {k4[:2] for k4 in keep}]:
                    bench.stop_triton(key)
            sweeps["genimg"] = grows
            if not args.no_ray:
                r = bench.run_ray(",".join(RAY_SWEEP), count=n_sweep)
                sweeps["ray_data"] = [{**x["config"], "images_per_s": x["images_per_s"]}
                                      for x in (r.get("all_runs") or [r])]  # one Ray session: same load
        ray_cfg = "64x2"
        if sweeps.get("ray_data"):
            top = max(sweeps["ray_data"], key=lambda x: x["images_per_s"])
            ray_cfg = f"{top['batch']}x{top['actors']}"
        result["sweeps"] = sweeps
        result["chosen"] = {"upper_bound": dict(zip(("batch", "threads", "intra_op"), best_upper)),
                            "genimg_default": DEFAULTS, "genimg_best": best, "ray_data": ray_cfg}

        # ---- rounds, interleaved, order rotating
        plan = {
            "upper_bound": lambda: bench.run_upper(*best_upper, bench.count),
            "genimg_default": lambda: bench.run_genimg(DEFAULTS, "genimg_default"),
            "genimg_best": lambda: bench.run_genimg(best, "genimg_best"),
            "naive_celery": bench.run_naive,
            "ray_data": lambda: bench.run_ray(ray_cfg),
        }
        if args.no_ray:
            plan.pop("ray_data")
        runs: dict[str, list[dict]] = {k: [] for k in plan}
        order = list(plan)
        for rnd in range(args.rounds):
            log.info("round %d of %d (load %.2f)", rnd + 1, args.rounds, os.getloadavg()[0])
            for name in order[rnd % len(order):] + order[:rnd % len(order)]:
                runs[name].append(plan[name]())
        result["triton_view"] = bench.run_triton_view()
        systems = {k: summarize(v) for k, v in runs.items()}
        for k, v in runs.items():
            systems[k]["runs"] = [_strip(r) for r in v]
        if args.no_ray:
            systems["ray_data"] = {"skipped": "--quick or --no-ray", "images_per_s": None}
        result["systems"] = systems
    finally:
        bench.close()
    add_ratios(result)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    write_outputs(result, out)
    log.info("wrote %s (%.0f s)\n%s", out, result["total_seconds"], markdown(result))
    return result


if __name__ == "__main__":
    main()
