"""The backlog signal (``genimg.queue.backlog``) and ``genimg exporter``, against real Redis, Celery and workers."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Consumer, Exchange, Queue

from genimg.queue import Backlog, backlog, priority_lists
from genimg.jobs import Keys
from producer import Client
from tests.fixtures.prometheus import start_exporter
from tests.fixtures.s3 import free_port
from tests.fixtures.workers import REDIS_URL, wait_for


def _celery_app(queue: str, redis_url: str = REDIS_URL, global_keyprefix: str = "") -> Celery:
    """A Celery app configured exactly as genimg's workers and producer are (plus an optional key prefix)."""
    from genimg.settings import WorkerSettings
    from genimg.queue import celery_config

    conf = celery_config(WorkerSettings(queue=queue, redis_url=redis_url))
    if global_keyprefix:
        conf["broker_transport_options"] = {**conf["broker_transport_options"], "global_keyprefix": global_keyprefix}
    app = Celery(f"test-{queue}")
    app.conf.update(conf)
    return app


def test_backlog_counts_waiting_shards_of_every_priority_level(producer_env):
    for priority, count in ((9, 4), (5, 6), (2, 2), (0, 8)):
        producer_env.client.submit(count=count, model="noise2img", output=producer_env.output, seed=priority,
                                   shard_size=2, priority=priority)

    lists = {m.list_name for m in producer_env.messages()}
    assert lists == set(priority_lists(producer_env.queue))  # one message list per kombu priority step
    assert backlog(producer_env.redis, producer_env.queue) == Backlog(producer_env.queue, waiting=10, reserved=0)
    assert backlog(producer_env.redis, "another-queue").total == 0


def test_backlog_honours_kombu_global_keyprefix_for_waiting_and_unacked_messages(tmp_path: Path):
    queue, prefix = f"genimg-btest-{uuid.uuid4().hex[:8]}", f"kp{uuid.uuid4().hex[:6]}:"
    app = _celery_app(queue, global_keyprefix=prefix)
    r = redis.Redis.from_url(REDIS_URL)
    exporter = start_exporter(tmp_path, "--queue", queue, "--redis-url", REDIS_URL, "--global-keyprefix", prefix)
    try:
        for i, celery_priority in enumerate((0, 4, 7, 9)):
            app.send_task("genimg.generate_shard", args=["0" * 32, i], queue=queue, priority=celery_priority)
        assert backlog(r, queue, prefix) == Backlog(queue, waiting=4, reserved=0)
        assert backlog(r, queue).total == 0  # without the prefix: other keys

        received = []
        consume = [Queue(queue, Exchange(queue), routing_key=queue)]
        with app.connection_for_read() as conn, Consumer(conn, queues=consume, accept=["json"], prefetch_count=1,
                                                         callbacks=[lambda body, m: received.append(m)]):
            wait_for(lambda: conn.drain_events(timeout=5) or received, 20, "one message delivered")
            assert backlog(r, queue, prefix) == Backlog(queue, waiting=3, reserved=1)
            assert exporter.backlog() == {(queue, "waiting"): 3, (queue, "reserved"): 1, (queue, "total"): 4}
            received[0].ack()
            assert backlog(r, queue, prefix) == Backlog(queue, waiting=3, reserved=0)
    finally:
        exporter.stop()
        for key in r.scan_iter(f"{prefix}*", count=1000):
            r.delete(key)
        app.close()


def test_exporter_serves_each_queue_by_kind_and_reads_redis_afresh_on_every_scrape(producer_env, tmp_path: Path):
    other = f"{producer_env.queue}-other"
    exporter = start_exporter(tmp_path, "--queue", producer_env.queue, "--queue", other, "--redis-url", REDIS_URL)
    try:
        producer_env.client.submit(count=6, model="noise2img", output=producer_env.output, seed=1, shard_size=2)
        assert exporter.backlog() == {(producer_env.queue, "waiting"): 3, (producer_env.queue, "reserved"): 0,
                                      (producer_env.queue, "total"): 3, (other, "waiting"): 0,
                                      (other, "reserved"): 0, (other, "total"): 0}
        assert exporter.up() == 1
        producer_env.drain()
        assert exporter.backlog()[(producer_env.queue, "total")] == 0
    finally:
        exporter.stop()


def test_exporter_says_redis_is_down_with_no_backlog_sample_and_recovers_when_it_returns(tmp_path: Path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start_redis() -> subprocess.Popen:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        wait_for(lambda: _pings(url), 20, "the private redis-server")
        return proc

    server = start_redis()
    exporter = start_exporter(tmp_path, "--queue", "q1", "--redis-url", url)
    try:
        _celery_app("q1", redis_url=url).send_task("genimg.generate_shard", args=["0" * 32, 0], queue="q1")
        assert exporter.backlog()[("q1", "total")] == 1
        server.terminate()
        server.wait(10)

        t0 = time.monotonic()
        assert exporter.up() == 0
        assert exporter.backlog() == {}  # never a stale number
        assert time.monotonic() - t0 < 8  # two scrapes, each well inside Prometheus's 10 s scrape timeout

        server = start_redis()  # empty: nothing was persisted
        assert wait_for(lambda: exporter.up() == 1, 20, "the exporter to see Redis again")
        assert exporter.backlog()[("q1", "total")] == 0
    finally:
        exporter.stop()
        server.terminate()
        server.wait(10)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.ConnectionError:
        return False


@pytest.mark.slow
def test_backlog_never_reads_zero_while_a_shard_waits_or_runs_and_counts_a_running_shard_as_reserved(stack, s3_bucket):
    """Acks late: a running shard's message stays in kombu's ``unacked`` hash until the shard has committed.

    Each poll reads the job's ``running`` hash, then the backlog, then the
    ``running`` hash and the done count again. A shard seen running in both
    reads was running when the backlog was read, so it must be counted as
    reserved; a backlog of 0 must mean every shard was done before it was read
    (the done count read after it is complete).
    """
    worker = stack.start_worker(GENIMG_CONCURRENCY=1)
    r = stack.redis
    queue, keys = stack.env["GENIMG_QUEUE"], Keys(stack.env["GENIMG_KEY_PREFIX"])
    worker.wait_ready()
    with Client() as client:
        job = client.submit(count=10, model="noise2img", output=f"s3://{s3_bucket}/bl", seed=2, shard_size=2)
    num_shards = job.spec.shard_plan().num_shards
    running_key, done_key = keys.job(job.job_id, "running"), keys.job(job.job_id, "done")
    seen_running_and_reserved, readings = 0, 0
    deadline = time.monotonic() + 120
    while True:
        before = set(r.hkeys(running_key))
        b = backlog(r, queue)
        after, done = set(r.hkeys(running_key)), r.hlen(done_key)
        readings += 1
        if before & after:
            assert b.reserved >= 1, f"a shard ran while the backlog read {b}"
            seen_running_and_reserved += 1
        if b.total == 0:
            assert done == num_shards, f"backlog read 0 with only {done}/{num_shards} shards done"
            break
        assert time.monotonic() < deadline, f"backlog still {b} after 120 s ({done}/{num_shards} done)"
        time.sleep(0.01)  # poll interval
    assert seen_running_and_reserved >= 3, (seen_running_and_reserved, readings)
    assert job.wait(progress=False, timeout_s=30).state == "succeeded"


def test_exporter_refuses_an_invalid_queue_name_with_exit_code_2():
    import sys

    proc = subprocess.run([sys.executable, "-m", "producer.cli", "exporter", "--port", str(free_port()),
                           "--queue", "no spaces allowed"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "invalid GENIMG_QUEUE='no spaces allowed': allowed" in proc.stderr and "Traceback" not in proc.stderr
