"""Helpers shared by the worker fault and metrics tests (real processes only, nothing mocked).

* :func:`private_redis` (module fixture): a ``redis-server`` of the test's own
  on a free port, with ``requirepass``. kombu keeps one ``unacked`` hash per
  Redis database and restores *every* entry older than the restoring
  worker's visibility timeout, whatever its queue; tests that shorten the
  visibility timeout therefore run on their own server, so they never
  redeliver (or get redelivered) the shards of other tests sharing
  127.0.0.1:6379.
* :func:`pstack`: the ``stack`` fixture pointed at that server.
* Worker log parsing (Celery's ``received``/``succeeded`` lines), a /metrics
  scraper, RSS and listening-port readers from ``/proc``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from genimg.queue import UNACKED_KEY
from genimg.jobs import Keys
from tests.fixtures.redisserver import RedisServer
from tests.fixtures.workers import Stack

SLOW_SHARD_ITEMS = 300
"""Items of a shard meant to be killed (or redelivered) mid-way. Measured on the 2-core dev machine:
noise2img with upscale at sub-batch 1 costs ~6.5 ms per item alone, so ~2 s per shard alone and 3-7 s
with two workers or other load."""

_RECEIVED = re.compile(r"Task genimg\.generate_shard\[([0-9a-f-]+)\] received")
_SUCCEEDED = re.compile(r"Task genimg\.generate_shard\[([0-9a-f-]+)\] succeeded in ([0-9.e-]+)s: (\{.*\})")


# --------------------------------------------------------------------------- a Redis of our own


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://:PASSWORD@127.0.0.1:PORT/0`` of a fresh ``redis-server`` with AUTH, for this module."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), password="rp-" + secrets.token_hex(12),
                         appendonly=False).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def pstack(stack: Stack, private_redis: str) -> Stack:
    """``stack`` on the module's own Redis (workers, the producer and the fixture's cleanup)."""
    stack.env["GENIMG_REDIS_URL"] = private_redis
    os.environ["GENIMG_REDIS_URL"] = private_redis  # restored by the stack fixture
    return stack


def keys_of(stack: Stack) -> Keys:
    return Keys(stack.env["GENIMG_KEY_PREFIX"])


def running_shards(stack: Stack, job_id: str) -> dict[int, str]:
    """Shard -> worker hostname of the shards a worker has started and not finished."""
    raw = stack.redis.hgetall(keys_of(stack).job(job_id, "running"))
    return {int(k): v.decode() for k, v in raw.items()}


def done_shards(stack: Stack, job_id: str) -> dict[int, str]:
    raw = stack.redis.hgetall(keys_of(stack).job(job_id, "done"))
    return {int(k): v.decode() for k, v in raw.items()}


def unacked_since(client, queue: str, task_id: str) -> float | None:
    """When (``time.time()``) a worker took ``task_id`` off ``queue`` without acking it yet, from
    kombu's ``unacked``/``unacked_index`` keys; ``None`` when it is not held unacknowledged."""
    for tag, raw in client.hscan_iter(UNACKED_KEY):
        payload, _, routing_key = json.loads(raw)
        if routing_key == queue and payload.get("headers", {}).get("id") == task_id:
            return client.zscore(f"{UNACKED_KEY}_index", tag)
    return None


# --------------------------------------------------------------------------- worker logs


def hostname_of(worker) -> str:
    """The Celery node name the fixture gave ``worker`` (``--hostname``)."""
    args = list(worker.proc.args)
    return args[args.index("--hostname") + 1]


def received(log: str) -> list[str]:
    """Task ids in the order the worker received them (a redelivered task appears again)."""
    return _RECEIVED.findall(log)


def results(log: str) -> list[tuple[str, float, dict]]:
    """``(task id, runtime seconds, returned dict)`` of every shard task the worker finished."""
    return [(tid, float(secs), ast.literal_eval(value)) for tid, secs, value in _SUCCEEDED.findall(log)]


# --------------------------------------------------------------------------- metrics


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label items: value}}`` of ``http://127.0.0.1:PORT/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if want <= set(k))


# --------------------------------------------------------------------------- /proc


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def listening_ports(pids: list[int]) -> set[int]:
    """TCP ports in LISTEN state whose socket any of ``pids`` holds open."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.exists() else ():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports
