"""The reconciler against real Redis and a real S3 API: it re-enqueues exactly the stranded shards.

A job is submitted with the real producer; then its queue is edited in Redis
the way kombu would have left it: one message lost (popped by a worker that
died before recording it), one delivered and unacknowledged (running), one
shard committed, one failed, the rest waiting. No workers run, so nothing
moves but what the test and the reconciler do.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from genimg import jobs
from genimg.layout import SUCCESS_OBJECT
from genimg.queue import UNACKED_KEY, priority_lists
from tests.fixtures.producer import ProducerEnv, commit_synthetic_shard
from tests.fixtures.workers import wait_for
from genimg.settings import WorkerSettings, stranded_after_s
from genimg.queue import shard_of_waiting
from workers.reconcile import Reconciler, ReconcileSettings

pytestmark = pytest.mark.timeout(60)


def _worker_settings(env: ProducerEnv) -> WorkerSettings:
    # The smallest safe timing: soft 1 < hard 2 < visibility 3, countdowns <= 1 s: a bound of 4 s.
    return WorkerSettings(redis_url=env.redis_url, queue=env.queue, key_prefix=env.key_prefix,
                          visibility_timeout_s=3, task_hard_time_limit_s=2, task_soft_time_limit_s=1,
                          retry_backoff_max_s=1)


def _waiting(env: ProducerEnv) -> list[tuple[str, int]]:
    return sorted(s for name in priority_lists(env.queue) for raw in env.redis.lrange(name, 0, -1)
                  if (s := shard_of_waiting(raw)) is not None)


def _take(env: ProducerEnv, shard: int) -> dict:
    """Remove one shard's message from the queue, as kombu's BRPOP does; returns the message document."""
    for name in priority_lists(env.queue):
        for raw in env.redis.lrange(name, 0, -1):
            found = shard_of_waiting(raw)
            if found is not None and found[1] == shard:
                env.redis.lrem(name, 1, raw)
                return json.loads(raw)
    raise AssertionError(f"no waiting message for shard {shard}")


@pytest.fixture
def unacked(producer_env: ProducerEnv):
    """Delivery tags this test wrote into kombu's shared ``unacked`` hash (removed afterwards)."""
    tags: list[str] = []
    yield tags
    if tags:
        producer_env.redis.hdel(UNACKED_KEY, *tags)


def test_only_the_shard_in_no_list_not_unacked_and_not_finished_is_requeued_after_the_bound(
        producer_env: ProducerEnv, unacked):
    env = producer_env
    job = env.client.submit(count=60, shard_size=10, output=env.output)  # shards 0..5
    spec = job.spec
    _take(env, 0)                                       # lost between BRPOP and the unacked write
    tag = uuid.uuid4().hex
    env.redis.hset(UNACKED_KEY, tag, json.dumps([_take(env, 1), "", env.queue]))  # running
    unacked.append(tag)
    _take(env, 2)
    commit_synthetic_shard(env, spec, 2)                # committed
    _take(env, 3)
    jobs.mark_failed(env.redis, env.client.keys, spec.job_id, 3, "ModelError: test")  # failed
    jobs.mark_running(env.redis, env.client.keys, spec.job_id, 0, "a-dead-worker")   # stale running record
    assert _waiting(env) == [(spec.job_id, 4), (spec.job_id, 5)]

    worker = _worker_settings(env)
    assert stranded_after_s(worker) == 4.0
    leader = Reconciler(env.redis, worker, ReconcileSettings(reconcile_interval_s=1, reconcile_lease_s=30),
                        storage=env.s3_settings)
    standby = Reconciler(env.redis, worker, ReconcileSettings(reconcile_interval_s=1, reconcile_lease_s=30),
                         storage=env.s3_settings)
    try:
        t0 = time.monotonic()
        first = leader.run_pass()
        assert first.leader and first.unfinished_jobs == 1 and first.stranded == 1 and first.requeued == []
        assert not standby.run_pass().leader  # one lease: the second replica does nothing
        report = wait_for(lambda: (r := leader.run_pass()).requeued and r, 15, "the stranded shard to be requeued",
                          interval_s=0.5)
        assert time.monotonic() - t0 >= 4.0
        assert [(j, s) for j, s, _ in report.requeued] == [(spec.job_id, 0)]
        assert 4.0 <= report.requeued[0][2] < 6.0  # seconds it stayed stranded
        assert _waiting(env) == [(spec.job_id, 0), (spec.job_id, 4), (spec.job_id, 5)]
        assert env.redis.hget(env.client.keys.job(spec.job_id, "running"), "0") is None
        # Nothing is stranded now: further passes add nothing.
        again = leader.run_pass()
        assert again.stranded == 0 and again.requeued == [] and len(_waiting(env)) == 3
        registry = leader.metrics.registry
        assert registry.get_sample_value("genimg_reconciler_shards_requeued_total", {"queue": env.queue}) == 1
        assert registry.get_sample_value("genimg_reconciler_stranded_seconds_count", {"queue": env.queue}) == 1
        assert registry.get_sample_value("genimg_jobs_unfinished", {"queue": env.queue}) == 1
        assert registry.get_sample_value("genimg_reconciler_leader") == 1
        assert standby.metrics.registry.get_sample_value("genimg_reconciler_leader") == 0
    finally:
        leader.close()
        standby.close()
    # The lease is free again: the standby takes over.
    standby2 = Reconciler(env.redis, worker, ReconcileSettings(), storage=env.s3_settings)
    try:
        assert standby2.run_pass().leader
    finally:
        standby2.close()


def test_a_shard_lost_again_and_again_is_failed_with_a_reason_and_the_job_is_finalised(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=20, shard_size=10, output=env.output)  # shards 0, 1
    spec = job.spec
    rec = Reconciler(env.redis, _worker_settings(env),
                     ReconcileSettings(reconcile_max_heals=1, reconcile_interval_s=1, reconcile_lease_s=30),
                     storage=env.s3_settings, stranded_after=0.3)
    try:
        _take(env, 0)
        _take(env, 1)
        commit_synthetic_shard(env, spec, 1)
        assert rec.run_pass().requeued == []
        healed = wait_for(lambda: rec.run_pass().requeued, 10, "the first heal", interval_s=0.2)
        assert [s for _, s, _ in healed] == [0]
        _take(env, 0)  # lost again
        assert rec.run_pass().failed == []
        failed = wait_for(lambda: rec.run_pass().failed, 10, "the shard to be given up", interval_s=0.2)
        assert failed == [(spec.job_id, 0)]
        reason = env.redis.hget(env.client.keys.job(spec.job_id, "failed"), "0").decode()
        assert reason.startswith("lost_repeatedly")
        # Every shard is done or failed; nobody finalised: the reconciler does, after the bound.
        finalised = wait_for(lambda: rec.run_pass().finalised, 10, "the job to be finalised", interval_s=0.2)
        assert finalised == [spec.job_id]
        summary = json.loads(env.store.get_bytes(f"runs/{spec.job_id}/{SUCCESS_OBJECT}"))
        assert summary["state"] == "failed" and summary["items_ok"] == 10 and summary["shards_failed"] == 1
        assert rec.metrics.registry.get_sample_value("genimg_reconciler_shards_failed_total",
                                                     {"queue": env.queue}) == 1
        assert rec.run_pass().unfinished_jobs == 0
    finally:
        rec.close()
