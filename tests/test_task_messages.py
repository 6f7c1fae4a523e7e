"""Raw task messages a worker must refuse: pickle, malformed JSON, bad arguments, unknown or edited jobs.

Each is published straight onto the real Redis queue with kombu, as an
attacker or a buggy client would; the worker must run nothing from it, log
the refusal, drop the message (no redelivery loop) and go on with real work.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from producer import Client
from tests.fixtures.workers import wait_for

pytestmark = pytest.mark.slow


class _Exploit:
    """Unpickling this creates a file: proof that pickle was (wrongly) accepted."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _publish(stack, body: bytes, content_type: str, args_repr: str = "") -> str:
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "genimg.generate_shard", "id": task_id, "root_id": task_id,
               "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
               "argsrepr": args_repr, "kwargsrepr": "{}"}
    with Connection(stack.env["GENIMG_REDIS_URL"]) as conn:
        conn.default_channel.basic_publish(
            conn.default_channel.prepare_message(body, priority=0, content_type=content_type,
                                                 content_encoding="binary" if "pickle" in content_type
                                                 or "python" in content_type else "utf-8",
                                                 headers=headers, properties={"delivery_info": {}}),
            exchange="", routing_key=stack.env["GENIMG_QUEUE"])
    return task_id


def _queue_empty(stack) -> bool:
    from genimg.queue import backlog

    return backlog(stack.redis, stack.env["GENIMG_QUEUE"]).total == 0


@pytest.fixture
def running_worker(stack):
    w = stack.start_worker()
    w.wait_ready()
    return w


def _json_task(job_id, shard) -> bytes:
    return json.dumps([[job_id, shard], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                             "chord": None}]).encode()


def test_a_pickled_message_is_refused_logged_and_never_unpickled(stack, running_worker, tmp_path: Path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    body = pickle.dumps([[_Exploit(str(marker)), 0], {}, {}])
    _publish(stack, body, "application/x-python-serialize")
    wait_for(lambda: "ContentDisallowed" in running_worker.log() or "refused" in running_worker.log().lower(),
             60, "the worker to log the refused pickle message")
    wait_for(lambda: _queue_empty(stack), 30, "the refused message to leave the queue")
    assert not marker.exists()
    assert running_worker.proc.poll() is None


def test_malformed_json_and_bad_arguments_run_nothing_and_the_worker_goes_on(stack, running_worker, s3_bucket):
    _publish(stack, b"{not json", "application/json")
    _publish(stack, _json_task("../../etc/passwd", 0), "application/json")
    _publish(stack, _json_task("0" * 32, -1), "application/json")
    _publish(stack, _json_task("f" * 32, 0), "application/json")  # a job nobody submitted
    wait_for(lambda: running_worker.log().count("rejected") >= 2, 60, "the bad arguments to be rejected")
    wait_for(lambda: "job spec unusable" in running_worker.log(), 60, "the unknown job to be rejected")
    with Client() as client:
        job = client.submit(count=3, model="noise2img", output=f"s3://{s3_bucket}/after", upscale=False)
        assert job.wait(progress=False, timeout_s=120).state == "succeeded"
    wait_for(lambda: _queue_empty(stack), 30, "every message to leave the queue")
    assert running_worker.proc.poll() is None


def test_a_job_spec_edited_in_redis_into_something_invalid_is_rejected_not_run(stack, s3_bucket):
    with Client() as client:
        job = client.submit(count=4, model="noise2img", output=f"s3://{s3_bucket}/edited", upscale=False,
                            shard_size=2)
        key = client.keys.job(job.job_id, "spec")
        spec = json.loads(stack.redis.get(key))
        spec["shard_size"] = -5
        stack.redis.set(key, json.dumps(spec))
        worker = stack.start_worker()
        worker.wait_ready()
        wait_for(lambda: worker.log().count("job spec unusable") >= 2, 120, "both shards to be rejected")
        assert "shard_size" in worker.log()
        store, layout = client.job_store(job.spec)
        assert not [k for k in store.list_keys(layout.shards_prefix)]
        # Recorded with the reason, so the job says why it cannot finish (before: "queued" for ever).
        failed = {int(k): v.decode() for k, v in stack.redis.hgetall(client.keys.job(job.job_id, "failed")).items()}
        assert sorted(failed) == [0, 1] and all(v.startswith("spec_unusable: ValidationError:") and
                                                "shard_size" in v for v in failed.values()), failed
