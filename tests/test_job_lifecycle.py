"""Job lifecycle with real workers: cancel mid-job, and resume after Redis lost the job mid-job."""

from __future__ import annotations

import pytest

from genimg.queue import backlog, priority_lists
from genimg.shards import committed_shards
from producer import Client
from tests.fixtures.workers import wait_for

pytestmark = pytest.mark.slow


def _submit(client: Client, bucket: str, prefix: str):
    # 40 shards of 5 items, one Triton request per item: long enough to act mid-job.
    return client.submit(count=200, model="noise2img", output=f"s3://{bucket}/{prefix}", seed=9, shard_size=5,
                         sub_batch_size=1, upscale=False)


def test_cancel_mid_job_starts_no_new_shard_and_ends_cancelled(stack, s3_bucket):
    worker = stack.start_worker()
    worker.wait_ready()
    with Client() as client:
        job = _submit(client, s3_bucket, "cancel")
        wait_for(lambda: job.status().shards_done >= 1, 120, "a first committed shard")
        job.cancel()
        assert job.wait(progress=False, timeout_s=60).state == "cancelled"
        wait_for(lambda: backlog(stack.redis, stack.env["GENIMG_QUEUE"]).total == 0, 120,
                 "the cancelled shards to drain")
        store, layout = client.job_store(job.spec)
        committed = committed_shards(store, layout)
    # at most the shard(s) running when cancel came finish; the rest never start
    assert 1 <= len(committed) < job.spec.shard_plan().num_shards - 5
    assert job.status().state == "cancelled"


def test_resume_after_redis_lost_the_job_mid_job_completes_from_storage(stack, s3_bucket):
    worker = stack.start_worker()
    worker.wait_ready()
    with Client() as client:
        job = _submit(client, s3_bucket, "flush")
        wait_for(lambda: job.status().shards_done >= 2, 120, "two committed shards")
        r = stack.redis
        for key in list(r.scan_iter(f"{stack.env['GENIMG_KEY_PREFIX']}:*")):
            r.delete(key)
        for name in priority_lists(stack.env["GENIMG_QUEUE"]):
            r.delete(name)
        resumed = job.resume()
        assert 0 < resumed < job.spec.shard_plan().num_shards
        status = job.wait(progress=False, timeout_s=300)
        assert status.state == "succeeded"
        table = job.manifest()
    assert table.num_rows == 200
    assert sorted(table.column("item_index").to_pylist()) == list(range(200))
