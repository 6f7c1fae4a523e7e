"""`genimg local up/status/env/down` with real processes: its own Redis, moto, tritonserver and a worker.

The first test starts everything itself (GENIMG_* cleared), so ``down`` must
stop every process it started, the tritonserver's Python-backend stubs
included; the second reuses the session's servers through the environment
and must leave them running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from genimg.local_procs import group_members
from tests.fixtures.workers import REDIS_URL

pytestmark = pytest.mark.slow


def _env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENIMG_")}
    env.update(GENIMG_LOCAL_DIR=str(state_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _genimg(env: dict[str, str], *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer.cli", "--log-level", "WARNING", "local", *args],
                          env=env, capture_output=True, text=True, timeout=timeout_s, check=False)


def _status(env: dict[str, str]) -> tuple[int, dict]:
    done = _genimg(env, "status", "--json", timeout_s=60)
    return done.returncode, json.loads(done.stdout)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_local_up_twice_starts_one_stack_and_down_leaves_no_process_of_it(tmp_path: Path, triton_repo: Path):
    env = _env(tmp_path / "state")
    started = time.monotonic()
    up = _genimg(env, "up", "--workers", "1", "--repo", str(triton_repo))
    assert up.returncode == 0, up.stderr
    try:
        code, doc = _status(env)
        assert code == 0 and doc["up"], doc
        rows = {r["name"]: r for r in doc["components"]}
        assert set(rows) == {"redis", "s3", "triton", "tritonserver", "worker-0"}
        assert all(r["state"] == "running" for r in rows.values()), rows
        assert all(Path(r["log"]).is_file() for r in rows.values())
        assert doc["env"]["GENIMG_REDIS_URL"] != "redis://127.0.0.1:6379/0"  # its own server, on a free port
        assert redis.Redis.from_url(doc["env"]["GENIMG_REDIS_URL"]).ping()
        pids = {r["pid"] for r in rows.values()}
        for r in rows.values():  # every process of every group: celery children, triton stubs
            pids.update(group_members(r["pid"]))
        stubs = group_members(rows["tritonserver"]["pid"])
        assert len(stubs) > 1, "the tritonserver group holds its Python-backend stubs"

        exports = _genimg(env, "env", timeout_s=60)
        assert exports.returncode == 0
        assert f"export GENIMG_TRITON_URL={doc['env']['GENIMG_TRITON_URL']}" in exports.stdout.splitlines()

        again = _genimg(env, "up", "--workers", "1", "--repo", str(triton_repo), timeout_s=60)
        assert again.returncode == 0, again.stderr
        assert "already up" in again.stderr
        _, doc2 = _status(env)
        assert {r["name"]: r["pid"] for r in doc2["components"]} == {n: r["pid"] for n, r in rows.items()}
    finally:
        down = _genimg(env, "down", timeout_s=180)
    assert down.returncode == 0, down.stderr
    assert [p for p in sorted(pids) if _alive(p)] == []
    shm = doc["info"]["triton_shm_prefix"]
    assert shm and not list(Path("/dev/shm").glob(f"{shm}*"))
    assert not (tmp_path / "state" / "local.json").exists()
    code, doc = _status(env)
    assert code == 1 and not doc["up"]
    assert time.monotonic() - started < 240  # ~30-90 s on an idle 2-core machine


def test_local_up_reuses_the_servers_named_in_the_environment_and_down_leaves_them_running(
        tmp_path: Path, triton_server, moto_s3_endpoint: str):
    env = _env(tmp_path / "state", GENIMG_REDIS_URL=REDIS_URL, GENIMG_TRITON_URL=triton_server.urls["grpc"],
               GENIMG_S3_ENDPOINT_URL=moto_s3_endpoint, GENIMG_S3_ACCESS_KEY_ID="testing",
               GENIMG_S3_SECRET_ACCESS_KEY="testing")
    assert triton_server.is_ready(), "the session's tritonserver is not serving"
    up = _genimg(env, "up", "--workers", "0", timeout_s=120)
    try:
        assert up.returncode == 0, up.stderr
        code, doc = _status(env)
        assert code == 0
        assert {r["name"]: r["state"] for r in doc["components"]} == {"redis": "external", "s3": "external",
                                                                       "triton": "external"}, up.stderr
        queue = doc["env"]["GENIMG_QUEUE"]
        assert queue.startswith("genimg-local-") and doc["env"]["GENIMG_KEY_PREFIX"] == queue
        assert "GENIMG_S3_ACCESS_KEY_ID" not in doc["env"]  # an external endpoint's credentials stay out of the file
    finally:
        down = _genimg(env, "down", timeout_s=180)
    assert down.returncode == 0, down.stderr
    assert redis.Redis.from_url(REDIS_URL).ping()
    assert triton_server.is_ready()


def test_status_follows_a_tritonserver_that_triton_serve_restarted(tmp_path: Path):
    """``genimg triton serve`` restarts a crashed tritonserver (a new pid) and says so in its log; ``status``
    (and ``down``) then mean the new process, not the dead one recorded at ``up``."""
    from genimg.local import LocalStack, StackState
    from genimg.local_procs import Proc, start_ticks

    dead = subprocess.Popen(["true"])
    dead.wait()
    new = subprocess.Popen(["sleep", "60"])
    try:
        log = tmp_path / "triton.log"
        log.write_text(f'{{"event": "ready", "pid": {dead.pid}}}\ntritonserver exited by itself (code -11)\n'
                       f'{{"event": "restarted", "pid": {new.pid}, "exit_code": -11}}\n')
        serve = Proc(name="triton", pid=os.getpid(), ticks=start_ticks(os.getpid()), log=str(log))
        old = Proc(name="tritonserver", pid=dead.pid, ticks=None, log=str(log))
        state = StackState(directory=str(tmp_path), env={}, procs={"triton": serve, "tritonserver": old},
                           external={}, info={}, created_at="2026-12-02T00:00:00+00:00")
        stack = LocalStack(tmp_path)
        stack._save(state)
        loaded = stack.load()
        assert loaded is not None
        assert loaded.procs["tritonserver"].pid == new.pid and loaded.procs["tritonserver"].alive()
        rows = {r["name"]: r for r in stack.status()["components"]}
        assert rows["tritonserver"]["state"] == "running" and rows["tritonserver"]["pid"] == new.pid
    finally:
        new.kill()
        new.wait()
    assert not stack.load().procs["tritonserver"].alive()
