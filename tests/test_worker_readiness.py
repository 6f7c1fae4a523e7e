"""Workers consume only when able to work: valid settings, and a Triton that serves every model they need.

Real ``genimg worker`` processes, the session's Triton (behind a TCP forwarder
that can be cut), moto's S3 and Redis.
"""

from __future__ import annotations

import re
import time

import pytest

from genimg.queue import backlog
from producer import Client
from tests.fixtures.s3 import free_port
from tests.fixtures.tcpforward import TcpForwarder
from tests.fixtures.triton import revive
from tests.fixtures.workers import wait_for

pytestmark = pytest.mark.slow

INVALID_SETTINGS = [
    ("GENIMG_TRITON_PROTOCOL", "grpcs"),
    ("GENIMG_PROFILES_DIR", "/nonexistent/profiles"),
    ("GENIMG_S3_ADDRESSING_STYLE", "subdomain"),
    ("GENIMG_S3_RETRY_MODE", "legacy"),
    ("GENIMG_CONCURRENCY", "0"),
    ("GENIMG_CONCURRENCY", "100000"),  # exhausted file descriptors and exited 0 before
    ("GENIMG_TRITON_MAX_MESSAGE_BYTES", "1"),  # started, then rejected every shard it took
    ("GENIMG_VISIBILITY_TIMEOUT_S", "soon"),
    ("GENIMG_REDIS_URL", "http://127.0.0.1:6379/0"),
    ("GENIMG_TRITON_URL", "127.0.0.1"),
    ("GENIMG_S3_ENDPOINT_URL", "ftp://127.0.0.1:9000"),
    ("GENIMG_METRICS_PORT", "70000"),
    ("GENIMG_RETRY_BUDGET_S", "-1"),
    ("GENIMG_MAX_RETRIES", "5"),  # no longer read: refused rather than silently ignored
    ("GENIMG_LOG_LEVEL", "LOUD"),
    ("GENIMG_S3_CA_BUNDLE", "/nonexistent/ca.pem"),
    ("GENIMG_TASK_SOFT_TIME_LIMIT_S", "50"),  # above the stack's hard limit (45): unsafe timing
]


def test_a_worker_with_an_invalid_setting_exits_2_naming_it_and_a_healthy_worker_runs_the_job(stack, s3_bucket):
    with Client() as client:
        job = client.submit(count=6, model="noise2img", upscale=False, shard_size=2,
                            output=f"s3://{s3_bucket}/invalid-settings")
        bad = {(var, value): stack.start_worker(**{var: value}) for var, value in INVALID_SETTINGS}
        for (var, _), w in bad.items():
            wait_for(lambda w=w: w.proc.poll() is not None, 60, f"the worker with an invalid {var} to exit")
        for (var, _), w in bad.items():
            out = w.log().strip()
            assert w.proc.returncode == 2, (var, w.proc.returncode, out)
            assert len(out.splitlines()) == 1 and var in out and "Traceback" not in out, (var, out)
            assert re.search(r"allowed|must|no longer read", out), out
        # None of them took anything: the three shard messages still wait in the queue.
        assert backlog(stack.redis, stack.env["GENIMG_QUEUE"]).waiting == 3
        healthy = stack.start_worker()
        healthy.wait_ready()
        status = job.wait(progress=False, timeout_s=120)
    assert status.state == "succeeded" and status.items_done == 6 and status.shards_failed == 0, status
    assert "Triton ready" in healthy.log() and "consuming shards" in healthy.log()


def _triton_seen(triton_server, port: int) -> str:
    """Triton's repository index asked directly and through the forwarder, for a failure message."""
    from genimg.triton.client import InferenceClient

    seen = []
    for name, url in (("direct", triton_server.urls["grpc"]), ("forwarded", f"127.0.0.1:{port}")):
        with InferenceClient(url, timeout_s=5) as client:
            try:
                seen.append(f"{name}: not ready {client.not_ready(['noise2img', 'faces'])}")
            except Exception as e:  # noqa: BLE001 - reported, not handled
                seen.append(f"{name}: {e}")
    return "; ".join(seen)


OUTAGE_S = 20.0
"""How long Triton stays unreachable: well past the old retry slack of this worker's settings (5 retries with
countdowns of at most 2 s: about 7.5 s, after which the shard used to be failed)."""


@pytest.mark.timeout(300)
def test_triton_down_longer_than_the_old_retry_slack_mid_job_pauses_consumption_and_fails_no_shard(
        stack, triton_server, s3_bucket):
    """Triton becomes unreachable while shards run and stays so for 20 s. The worker stops taking shards; the
    shard that met the outage is retried, and its retry waits (in the queue, or held on its countdown) without
    failing until Triton is back, within its time budget; the job completes with every item once and no shard
    failed."""
    port = free_port()
    forwarder = TcpForwarder(port, triton_server.urls["grpc"]).start()
    worker = stack.start_worker(GENIMG_TRITON_URL=f"127.0.0.1:{port}", GENIMG_RETRY_BACKOFF_BASE_S=0.5,
                                GENIMG_RETRY_BACKOFF_MAX_S=2, GENIMG_RETRY_BUDGET_S=120,
                                GENIMG_TRITON_CHECK_INTERVAL_S=0.5, GENIMG_TRITON_READY_TIMEOUT_S=2,
                                GENIMG_TRITON_TIMEOUT_S=5)
    worker.wait_ready()
    queue = stack.env["GENIMG_QUEUE"]
    try:
        with Client() as client:
            job = client.submit(count=48, model="noise2img", upscale=True, shard_size=8, sub_batch_size=2,
                                output=f"s3://{s3_bucket}/triton-down")
            wait_for(lambda: job.status().shards_done >= 1, 120, "the first shard")
            forwarder.stop()  # Triton unreachable, mid-job: connections cut, new ones refused
            down_at = time.monotonic()
            wait_for(lambda: "Triton cannot serve" in worker.log(), 30, "the worker to stop taking shards")
            wait_for(lambda: "shard retry 1 in" in worker.log(), 30, "a running shard to meet the outage")
            # The outage lasts OUTAGE_S: the job must neither fail a shard nor lose one meanwhile.
            wait_for(lambda: time.monotonic() - down_at >= OUTAGE_S, OUTAGE_S + 5, "the outage to last")
            during = job.status()
            assert during.shards_failed == 0 and during.state == "running", during
            assert backlog(stack.redis, queue).total >= 1  # retries wait in the queue or held, unacknowledged
            revive(triton_server)  # cutting a request can crash Triton 2.51 (server#7368): its supervisor restarts it
            forwarder.start()  # Triton is back on the same address
            try:
                status = job.wait(progress=False, timeout_s=180)
            except TimeoutError as e:  # say what the worker saw (the gate's checks, the retries) and Triton's state
                raise AssertionError(f"{e}; {job.status()}\n{_triton_seen(triton_server, port)}\n"
                                     f"worker log:\n{worker.log()[-6000:]}") from e
        assert status.state == "succeeded" and status.shards_failed == 0 and status.items_done == 48, status
        manifest = job.manifest()
        assert sorted(manifest.column("item_index").to_pylist()) == list(range(48))
        log = worker.log()
        assert "shard failed" not in log and "retries_exhausted" not in log
        assert log.index("Triton cannot serve") < log.rindex("consuming shards")  # paused, then resumed
        # While paused, the gate said why every 10 check intervals (5 s here).
        assert re.search(r"still not taking shards from queue \S+ \(paused for \d+ s\): \S", log), log[-3000:]
    finally:
        forwarder.stop()


def test_a_stuck_triton_check_is_killed_and_restarted_so_the_gate_can_open_again(triton_server):
    """The checker process stops answering (SIGSTOP: a process stuck in a call looks the same from outside).
    The watch reports "not ready" once its last answer is stale, its watchdog kills the silent checker after
    ``silent_s`` and starts a new one, and the watch reports "ready" again from the new process."""
    import os
    import signal

    from workers.gate import TritonWatch

    watch = TritonWatch(triton_server.urls["grpc"], "grpc", ["noise2img", "faces"], interval_s=0.5).start()
    try:
        wait_for(lambda: watch.status()[0], 60, "the first good check")
        stuck = watch._proc
        assert stuck is not None and watch.silent_s == 10.0
        os.kill(stuck.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: not watch.status()[0], 30, "the stale answer to count as not ready")
        assert "no Triton check answered" in watch.status()[1], watch.status()
        wait_for(lambda: stuck.poll() is not None, 60, "the watchdog to kill the silent checker")
        assert stuck.returncode == -signal.SIGKILL
        assert time.monotonic() - stopped >= watch.silent_s - watch.interval_s
        wait_for(lambda: watch.status()[0] and watch._proc is not stuck, 60, "a new checker's good answer")
        assert watch.restarts == 1 and watch._proc is not None and watch._proc.pid != stuck.pid
    finally:
        watch.stop()
