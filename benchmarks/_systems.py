"""The servers, worker sets and timed runs of one ``bench.py`` invocation (:class:`Bench`).

Every run is measured by :meth:`Bench.measure`: a :class:`~benchmarks._infra.Sampler`
over the system's process trees (CPU per process kind and per Triton model,
peak RSS, a CPU timeline for the idle split), the load average and the share
of the CPUs that other processes used meanwhile. genimg runs also record
Triton's per-model counters (``/metrics`` deltas: items, batches formed,
compute and queue time).

The bench's profiles directory (``GENIMG_PROFILES_DIR`` of every process it
starts) holds the bundled profiles it runs (``txt2img``, ``noise2img``,
``faces_x4`` and their variants) and ``txt2img_per_image``: the txt2img
pipeline as it was before issue 20 (the text encoder the ensemble's first step,
every image's prompt embedded), for the same-run comparison.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import _infra
from benchmarks._infra import BENCH_DIR, ROOT, THREAD_ENV, Sampler
from benchmarks._speed import SpeedProbe

log = logging.getLogger("bench")

BUCKET = "genimg-bench"
SEED = 1234
RAY_VENV = ROOT / ".cache" / "bench" / "ray-venv"
RAY_PACKAGES = ("ray[data]", "onnxruntime", "tokenizers", "pillow", "boto3", "psutil", "imagehash")
BUNDLED = ("txt2img", "txt2img_base", "noise2img", "noise2img_base", "faces", "faces_x4")
"""Bundled profiles copied into the bench's profiles directory."""
PER_IMAGE_PROFILE = '''# txt2img as it was before issue 20 (written by benchmarks/_systems.py for the same-run comparison):
# the text encoder is the ensemble's first step, so every image's prompt is embedded.
name = "txt2img_per_image"
task = "text"
triton_model = "txt2img_per_image"
description = "txt2img with the prompt embedded once per image (the rule before issue 20)"
licence = "Apache-2.0 (weights trained by genimg on MNIST, CC BY-SA 3.0; text encoder all-MiniLM-L6-v2, Apache-2.0)"
finite = "FINITE"

[inputs.PROMPT]
kind = "prompt"
dtype = "BYTES"

[inputs.Z]
kind = "noise"
dtype = "FP32"
shape = [100]
distribution = "normal"

[image]
tensor = "IMAGE"
dtype = "UINT8"
layout = "HWC"
channels = 1
height = 112
width = 112

[metadata.label]
tensor = "LABEL"
type = "int"
dtype = "INT32"

[metadata.score]
tensor = "SCORE"
type = "float"
dtype = "FP32"

[[serve.ensemble]]
model = "text_encoder"
inputs = { PROMPT = "PROMPT" }
outputs = { EMBEDDING = "embedding" }

[[serve.ensemble]]
model = "generator"
inputs = { Z = "Z", COND = "embedding" }
outputs = { IMAGE = "small_image", FINITE = "FINITE" }

[[serve.ensemble]]
model = "upscaler"
inputs = { IMAGE = "small_image" }
outputs = { UPSCALED = "IMAGE" }

[[serve.ensemble]]
model = "verifier"
inputs = { IMAGE = "small_image" }
outputs = { LABEL = "LABEL", SCORE = "SCORE" }
'''


@dataclass
class TritonHandle:
    key: tuple[int, int]
    server: object
    repo: Path

    @property
    def grpc(self) -> str:
        return self.server.urls["grpc"]  # type: ignore[attr-defined]

    @property
    def metrics(self) -> str:
        return self.server.urls["metrics"]  # type: ignore[attr-defined]


@dataclass
class WorkerSet:
    key: tuple
    queue: str
    prefix: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)


def triton_models(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model, from two ``/metrics`` scrapes: items, batches, average batch, compute and queue ms."""
    models: dict[str, dict[str, float]] = {}
    for (metric, model), v in after.items():
        models.setdefault(model, {})[metric] = v - before.get((metric, model), 0.0)
    out = {}
    for model, m in sorted(models.items()):
        items, execs = m.get("nv_inference_count", 0.0), m.get("nv_inference_exec_count", 0.0)
        reqs = m.get("nv_inference_request_success", 0.0)
        if not items:
            continue
        out[model] = {
            "items": int(items), "requests": int(reqs), "batches": int(execs),
            "avg_batch": round(items / execs, 2) if execs else None,
            "compute_infer_ms_per_item": round(m.get("nv_inference_compute_infer_duration_us", 0.0) / items / 1e3, 4),
            "compute_io_ms_per_item": round((m.get("nv_inference_compute_input_duration_us", 0.0)
                                             + m.get("nv_inference_compute_output_duration_us", 0.0)) / items / 1e3, 4),
            "queue_ms_per_request": round(m.get("nv_inference_queue_duration_us", 0.0) / reqs / 1e3, 3) if reqs
            else None}
    return out


class Bench:
    """Servers, worker sets and timed runs of one benchmark invocation."""

    def __init__(self, args) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="run-", dir=cache_dir()))
        self.env = {**os.environ, **THREAD_ENV}
        self.tritons: dict[tuple[int, int], TritonHandle] = {}
        self.workers: dict[tuple, WorkerSet] = {}
        self.naive: subprocess.Popen | None = None
        self.naive_queue = f"naive-{uuid.uuid4().hex[:8]}"
        self.servers: list[_infra.Server] = []
        self.run_no = 0

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        from genimg.models.fetch import fetch_model
        from genimg.models.text_encoder import package_model_dir
        from genimg.profiles.registry import BUNDLED_DIR
        from genimg.triton.repo import ensure_onnx

        a = self.args
        self.onnx_dir = ensure_onnx().resolve()
        self.speed = SpeedProbe(self.onnx_dir)
        self.tokenizer = package_model_dir() / "tokenizer.json"
        self.faces_onnx = fetch_model("faces")
        self.esrgan_onnx = fetch_model("esrgan_slim_x4")
        self.profiles_dir = self.tmp / "profiles"
        self.profiles_dir.mkdir()
        for name in BUNDLED:
            shutil.copyfile(BUNDLED_DIR / f"{name}.toml", self.profiles_dir / f"{name}.toml")
        (self.profiles_dir / "txt2img_per_image.toml").write_text(PER_IMAGE_PROFILE)
        self.env["GENIMG_PROFILES_DIR"] = str(self.profiles_dir)
        self.ipp = a.images_per_prompt
        n_prompts = -(-a.images // self.ipp)
        self.count = n_prompts * self.ipp
        self.faces_count = a.faces_images
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
            from genimg.profiles import load_profiles
            from genimg.triton.repo import build_repository
            from genimg.triton.server import TritonServer

            repo = build_repository(self.tmp / f"repo-i{instances}-d{delay_us}", "cpu", self.onnx_dir,
                                    instances=instances, queue_delay_us=delay_us, intra_op_threads=1,
                                    profiles=load_profiles(self.profiles_dir))
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
        # clients, imports, and each model's first-run allocations (the faces models have no Triton warmup)
        self._genimg_job(ws, warm_count=8 * n * 4, shard_size=8, sub_batch_size=8)
        # and requests of the largest sub-batch the runs send, so that every model instance has grown its
        # ONNX Runtime memory arena before a clock runs (the first job otherwise pays those page faults)
        self._genimg_job(ws, warm_count=512 * n, shard_size=256, sub_batch_size=256)
        self._genimg_job(ws, model="faces_x4", warm_count=32 * n, shard_size=16, sub_batch_size=16)  # faces runs: 16
        return ws

    def stop_workers(self, key: tuple) -> None:
        ws = self.workers.pop(key, None)
        if ws is not None:
            for p in ws.procs:
                _infra.stop(p, timeout_s=30)

    def naive_workers(self, defaults: dict) -> subprocess.Popen:
        if self.naive is None:
            tri = self.triton(defaults["instances"], defaults["queue_delay_us"])
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

    def _genimg_job(self, ws: WorkerSet, *, shard_size: int, sub_batch_size: int, model: str = "txt2img",
                    prompts: Path | None = None, count: int | None = None, warm_count: int | None = None,
                    sampler: Sampler | None = None) -> dict:
        """One job through ``ws``; ``warm_count``: a warm-up job of that many items (8 per prompt), then deleted."""
        self.run_no += 1
        prefix = f"genimg/{self.run_no:04d}"
        text = model.startswith("txt2img")
        job = ["--model", model]
        if text:
            ipp = 8 if warm_count else self.ipp
            if warm_count:
                prompts = self.tmp / "warm.txt"
                prompts.write_text("\n".join(f"warm {i}" for i in range(-(-warm_count // 8))) + "\n")
            job += ["--prompts", str(prompts or self.prompts_file), "--images-per-prompt", str(ipp)]
        else:
            job += ["--count", str(warm_count or count)]
        env = {**self.env, "GENIMG_QUEUE": ws.queue, "GENIMG_KEY_PREFIX": ws.prefix}
        cmd = [sys.executable, str(BENCH_DIR / "genimg_run.py"), *job, "--seed", str(SEED), "--output",
               f"s3://{BUCKET}/{prefix}", "--shard-size", str(shard_size), "--sub-batch-size", str(sub_batch_size)]
        try:
            return self._child(cmd, env, sampler, timeout_s=900)
        finally:
            if warm_count:
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
        """Run ``fn(sampler)`` under a :class:`Sampler` of ``roots``; adds CPU, RSS, idle and load figures.

        The driver child's CPU before its clock started (imports, sessions, Ray's start-up:
        ``setup_cpu_s`` in its report) is taken off the total and off ``driver_kind``.
        """
        load0 = os.getloadavg()[0]
        busy0 = _infra.host_busy_s()
        t0 = time.perf_counter()
        with self.speed, Sampler(list(roots)) as sampler:
            res = fn(sampler)
        wall = time.perf_counter() - t0
        busy = _infra.host_busy_s() - busy0 - self.speed.cpu_s()  # the probe is the bench's, not others' load
        rep = sampler.report()
        setup = float(res.get("setup_cpu_s", 0.0))
        ours = max(0.0, rep["cpu_s"] - setup)
        if driver_kind in rep["cpu_s_by_kind"]:
            rep["cpu_s_by_kind"][driver_kind] = round(max(0.0, rep["cpu_s_by_kind"][driver_kind] - setup), 3)
        res.update(rep)
        res["cpu_s"] = round(ours, 3)
        res["cpu_s_per_image"] = round(ours / res["images"], 6)
        res["n_cpus"] = len(self.args.cpus)
        if res.get("t0_epoch") and res.get("t1_epoch"):
            res["idle"] = _infra.idle_split(sampler.timeline, res["t0_epoch"], res["t1_epoch"], res["n_cpus"])
        res["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        res["host_busy_share_other"] = round(max(0.0, busy - rep["cpu_s"]) / (wall * len(self.args.cpus)), 3)
        t0e, t1e = res.get("t0_epoch"), res.get("t1_epoch")
        res["speed"] = self.speed.summary(t0e, t1e)  # the clock's window only
        if res.get("actor_ready_s") is not None and t0e:  # Ray's steady state: after its actor pool is ready
            res["speed_steady"] = self.speed.summary(t0e + res["actor_ready_s"], t1e)
        res.pop("job_id", None)
        log.info("%-22s %8.1f images/s  %.2f s  cpu %.2f ms/image  load %.2f  others %.2f", system,
                 res["images_per_s"], res["seconds"], 1000 * res["cpu_s_per_image"], load0,
                 res["host_busy_share_other"])
        return res

    def _base_roots(self, tri: TritonHandle | None) -> list[int]:
        roots = [self.redis.proc.pid, self.moto.proc.pid]
        if tri is not None:
            roots.append(tri.server.pid)  # type: ignore[attr-defined]
        return roots

    def run_upper(self, batch: int, threads: int, intra: int, count: int, *, profile: str = "txt2img",
                  per_image: bool = False, name: str = "upper_bound") -> dict:
        out_dir = self.tmp / "upper-out"
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [sys.executable, str(BENCH_DIR / "upper_bound.py"), "--profile", profile, "--onnx-dir",
               str(self.onnx_dir), "--count", str(count), "--seed", str(SEED), "--batch", str(batch), "--threads",
               str(threads), "--intra-op", str(intra), "--out-dir", str(out_dir)]
        if profile.startswith("txt2img"):
            cmd += ["--prompts", str(self.prompts_file), "--images-per-prompt", str(self.ipp)]
        if per_image:
            cmd.append("--per-image-prompt")
        try:
            return self.measure(name, [], lambda s: self._child(cmd, self.env, s, timeout_s=900), "upper_bound")
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    def run_genimg(self, cfg: dict, name: str = "genimg", count: int | None = None, model: str = "txt2img") -> dict:
        """One genimg job with settings ``cfg``; ``count`` items (default the job's), ``model`` a profile."""
        from benchmarks.triton_view import scrape

        ws = self.worker_set(cfg["instances"], cfg["queue_delay_us"], cfg["workers"], cfg["infer_inflight"])
        tri = self.tritons[(cfg["instances"], cfg["queue_delay_us"])]
        roots = self._base_roots(tri) + [p.pid for p in ws.procs]
        job: dict = {"model": model, "shard_size": cfg["shard_size"], "sub_batch_size": cfg["sub_batch_size"]}
        if model.startswith("txt2img"):
            if count is not None and count != self.count:
                job["prompts"] = self.tmp / f"prompts-{count}.txt"
                lines = self.prompts_file.read_text().splitlines()
                job["prompts"].write_text("\n".join(lines[:-(-count // self.ipp)]) + "\n")
        else:
            job["count"] = count or self.faces_count
        run = self.run_no + 1
        before = scrape(tri.metrics)
        res = self.measure(name, roots, lambda s: self._genimg_job(ws, sampler=s, **job), "genimg_producer")
        res["triton_models"] = triton_models(before, scrape(tri.metrics))
        res["config"] = {**cfg, "model": model}
        _infra.empty_prefix(self.moto.url, BUCKET, f"genimg/{run:04d}/")
        return res

    def run_naive(self, defaults: dict, count: int) -> dict:
        naive = self.naive_workers(defaults)
        tri = self.tritons[(defaults["instances"], defaults["queue_delay_us"])]
        run = self.run_no + 1
        res = self.measure("naive_celery", self._base_roots(tri) + [naive.pid],
                           lambda s: self._naive_job(count=count, sampler=s), "naive_producer")
        res["config"] = {"concurrency": self.args.cpus_n, "triton": "default repository"}
        _infra.empty_prefix(self.moto.url, BUCKET, f"naive/{run:04d}/")
        return res

    def ray_python(self) -> Path:
        py = RAY_VENV / "bin" / "python"
        if not py.is_file() or subprocess.run([str(py), "-c", "import ray.data, onnxruntime, tokenizers, PIL, boto3, "
                                               "psutil, imagehash"], capture_output=True).returncode:
            log.info("installing Ray into %s (first use)", RAY_VENV)
            subprocess.run([sys.executable, "-m", "venv", str(RAY_VENV)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", *RAY_PACKAGES], check=True)
        return py

    def run_ray(self, configs: str, count: int | None = None, pipeline: str = "txt2img",
                name: str = "ray_data") -> dict:
        py = self.ray_python()
        self.run_no += 1
        prefix = f"ray/{self.run_no:04d}"
        # Ray's memory monitor kills workers when the *machine* is at 95 % of its memory; here most of that is
        # other helpers' work and this benchmark's idle Triton servers, not Ray's: it killed actors mid-run
        # in 2 of 3 faces_ray_data runs of 2026-12-01 run 2 (benchmarks/README.md). Off, as for every system.
        env = {**self.env, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_memory_monitor_refresh_ms": "0"}
        env.pop("PYTHONPATH", None)
        cmd = [str(py), str(BENCH_DIR / "ray_data.py"), "--pipeline", pipeline, "--seed", str(SEED), "--endpoint",
               self.moto.url, "--bucket", BUCKET, "--prefix", prefix, "--configs", configs, "--num-cpus",
               str(self.args.cpus_n)]
        if pipeline == "faces_x4":
            cmd += ["--faces-onnx", str(self.faces_onnx), "--esrgan-onnx", str(self.esrgan_onnx), "--count",
                    str(count or self.faces_count)]
        else:
            cmd += ["--onnx-dir", str(self.onnx_dir), "--tokenizer", str(self.tokenizer), "--prompts",
                    str(self.prompts_file), "--images-per-prompt", str(self.ipp), "--count", str(count or self.count)]

        def go(sampler: Sampler) -> dict:
            out = self._child(cmd, env, sampler, timeout_s=900)
            runs = out["runs"]
            first = dict(runs[0])
            first.update(ray_version=out["ray_version"], init_s=out["init_s"], setup_cpu_s=out["setup_cpu_s"],
                         all_runs=runs if len(runs) > 1 else None)
            return first

        res = self.measure(name, [self.moto.proc.pid], go, "ray_system")
        _infra.empty_prefix(self.moto.url, BUCKET, prefix + "/")
        return res

    def run_triton_view(self, defaults: dict) -> dict:
        tri = self.triton(defaults["instances"], defaults["queue_delay_us"])
        q = self.args.quick
        cmd = [sys.executable, str(BENCH_DIR / "triton_view.py"), "--grpc", tri.grpc, "--metrics", tri.metrics,
               "--concurrency", "1,2" if q else "1,2,3,4,5,6,7,8", "--images-per-prompt", str(self.ipp),
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


def cache_dir() -> Path:
    d = ROOT / ".cache" / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d
