"""Seconds and peak resident memory to plan and enqueue a 10^6-item job (no workers running).

Scenarios, each in a fresh child process so that its peak RSS is its own:

- ``noise_1e6``: ``submit(count=1_000_000, model="noise2img")``, default shard
  size (1,000 items: 1,000 task messages);
- ``txt_1e6``: ``submit(prompts="prompts.txt")`` with 10^6 prompts from a text
  file, streamed into 1,000 prompt chunks in S3, 1,000 task messages;
- ``noise_1e6_shard10``: 10^6 items in shards of 10: 100,000 task messages
  (the enqueue path under load).

Against the local Redis (``GENIMG_REDIS_URL``, default
``redis://127.0.0.1:6379/0``; a private queue and key prefix, deleted at the
end) and a moto S3 server this script starts on a free loopback port. Prints
one JSON object::

    {"scenarios": {"noise_1e6": {"seconds": …, "enqueue_seconds": …, "peak_rss_mib": …,
                                 "baseline_rss_mib": …, "messages": …, "objects": …}, …},
     "setup": {…}}

``seconds`` is the whole ``Client.submit`` (validate, stream prompts, write
job.json, store the spec, enqueue); ``enqueue_seconds`` the enqueue part;
``baseline_rss_mib`` the child's peak RSS before submitting (interpreter,
imports, clients), ``peak_rss_mib`` its peak RSS after.

Usage::

    python benchmarks/producer_scale.py
    python benchmarks/producer_scale.py --scenarios noise_1e6,txt_1e6
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_ITEMS = 1_000_000
SCENARIOS = ("noise_1e6", "txt_1e6", "noise_1e6_shard10")
REDIS_URL = os.environ.get("GENIMG_REDIS_URL", "redis://127.0.0.1:6379/0")
BUCKET = "genimg-bench"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _storage(endpoint: str):  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    from genimg.settings import StorageSettings

    return StorageSettings(s3_endpoint_url=endpoint, s3_access_key_id=SecretStr("bench"),
                           s3_secret_access_key=SecretStr("bench"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_moto(log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log = open(log_dir / "moto.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/moto-api/data.json")
            conn.getresponse().read()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)  # polling interval while the server starts
        finally:
            conn.close()
    proc.kill()
    raise RuntimeError("moto server did not start")


def _write_prompts(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(f"a handwritten digit {i % 10}, variation {i}, neat pen strokes\n")


def run_child(scenario: str, endpoint: str, prompts: Path, queue: str, prefix: str) -> dict:
    """One scenario in this process; returns its measurements."""
    import redis

    from genimg.queue import priority_lists
    from producer.client import Client

    storage = _storage(endpoint)
    client = Client(REDIS_URL, queue=queue, key_prefix=prefix, storage=storage)
    client.redis.ping()
    client._app()  # build the Celery app before the baseline, as a long-lived client would have it
    enqueue_s = 0.0
    original = client.enqueue_shards

    def timed_enqueue(spec, shards):  # type: ignore[no-untyped-def]
        nonlocal enqueue_s
        t = time.perf_counter()
        try:
            return original(spec, shards)
        finally:
            enqueue_s = time.perf_counter() - t

    client.enqueue_shards = timed_enqueue  # type: ignore[method-assign]
    baseline = _rss_mib()
    output = f"s3://{BUCKET}/{scenario}"
    t0 = time.perf_counter()
    if scenario == "noise_1e6":
        job = client.submit(count=N_ITEMS, output=output, seed=1)
    elif scenario == "txt_1e6":
        job = client.submit(prompts=prompts, output=output, seed=1)
    elif scenario == "noise_1e6_shard10":
        job = client.submit(count=N_ITEMS, output=output, seed=1, shard_size=10)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    seconds = time.perf_counter() - t0
    peak = _rss_mib()
    r = redis.Redis.from_url(REDIS_URL)
    messages = sum(r.llen(name) for name in priority_lists(queue))
    store, layout = client.job_store(job.spec)
    objects = len(store.list_keys(f"{layout.job_prefix}/"))
    client.close()
    return {"seconds": round(seconds, 3), "enqueue_seconds": round(enqueue_s, 3),
            "peak_rss_mib": round(peak, 1), "baseline_rss_mib": round(baseline, 1),
            "items": job.spec.total_items, "shards": job.spec.shard_plan().num_shards,
            "messages": messages, "objects": objects,
            "messages_per_s": round(messages / enqueue_s, 1) if enqueue_s else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.endpoint, Path(args.prompts), args.queue, args.prefix)))
        return

    import redis

    from genimg.stores.s3 import S3Store

    scenarios = [s for s in args.scenarios.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="genimg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        moto, endpoint = _start_moto(tmp)
        r = redis.Redis.from_url(REDIS_URL)
        results: dict[str, dict] = {}
        try:
            admin = S3Store(_storage(endpoint), BUCKET)
            admin.ensure_bucket()
            prompts = tmp / "prompts.txt"
            t = time.perf_counter()
            _write_prompts(prompts, N_ITEMS)
            prompt_file = {"lines": N_ITEMS, "mib": round(prompts.stat().st_size / 2**20, 1),
                           "write_s": round(time.perf_counter() - t, 2)}
            for scenario in scenarios:
                tag = uuid.uuid4().hex[:8]
                queue, prefix = f"genimg-bench-{tag}", f"genimg-bench-{tag}"
                try:
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", scenario, "--endpoint", endpoint,
                         "--prompts", str(prompts), "--queue", queue, "--prefix", prefix],
                        capture_output=True, text=True, check=True, timeout=1800)
                    results[scenario] = json.loads(out.stdout.strip().splitlines()[-1])
                except subprocess.CalledProcessError as e:
                    results[scenario] = {"error": e.stderr[-2000:]}
                finally:
                    for pattern in (f"{prefix}:*", f"*{queue}*"):
                        for key in r.scan_iter(pattern, count=1000):
                            r.delete(key)
                    admin.delete_prefix(f"{scenario}/")
            admin.delete_prefix("", everything=True)
            admin.client.delete_bucket(Bucket=BUCKET)
            admin.close()
        finally:
            moto.terminate()
            moto.wait(10)
    print(json.dumps({"scenarios": results,
                      "setup": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "machine": platform.machine(), "redis": "local", "s3": "moto server (loopback)",
                                "prompt_file": prompt_file}}, indent=2))


if __name__ == "__main__":
    main()
