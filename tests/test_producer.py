"""The producer's Python client against real Redis and a real S3 API (moto's server); no workers.

What a submit leaves behind is read back from the real places: ``job.json``
and prompt chunks in the bucket, the spec in Redis, and the raw Celery
messages in kombu's Redis lists. Workers are simulated where needed by
committing shards with :func:`genimg.shards.commit_shard` and recording them
with :mod:`genimg.jobs`, as a worker does.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genimg import jobs
from genimg.errors import ConflictError, QueueUnavailableError, ValidationError
from genimg.inputs import decode_prompt_chunk, prompt_chunk_key
from genimg.layout import SPEC_OBJECT, SUCCESS_OBJECT
from genimg.queue import celery_priority
from genimg.spec import JobSpec
from genimg.queue import TASK_NAME
from producer.client import Client
from producer.job import JobNotFoundError, WaitTimeoutError
from tests.fixtures.producer import ProducerEnv, commit_synthetic_shard as commit
from tests.producer_cases import BAD_INPUTS, BadInput

pytestmark = pytest.mark.timeout(60)

def stored_prompts(env: ProducerEnv, spec: JobSpec) -> list[str]:
    store, layout = env.client.job_store(spec)
    assert spec.prompt_chunk_size is not None
    out: list[str] = []
    for c in range(math.ceil(spec.num_prompts / spec.prompt_chunk_size)):
        out += decode_prompt_chunk(store.get_bytes(f"{layout.job_prefix}/{prompt_chunk_key(c)}"))
    return out


def assert_nothing_stored_or_enqueued(env: ProducerEnv) -> None:
    assert env.stored_keys() == []
    assert env.messages() == []
    assert env.redis_keys() == []


# --------------------------------------------------------------------------- submit


def test_submit_noise_job_stores_job_json_and_enqueues_one_json_message_per_shard(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=2_500, output=env.output, seed=7, shard_size=1_000, priority="high", name="n1")
    spec = job.spec
    assert (spec.model, spec.count, spec.total_items, spec.shard_plan().num_shards) == ("noise2img", 2_500, 2_500, 3)

    stored = JobSpec.from_json(env.store.get_bytes(f"runs/{job.job_id}/{SPEC_OBJECT}"))
    assert stored == spec
    assert JobSpec.from_json(env.redis.get(env.client.keys.job(job.job_id, "spec"))) == spec
    assert env.redis.zscore(env.client.keys.jobs, job.job_id) is not None
    assert env.stored_keys() == [f"runs/{job.job_id}/{SPEC_OBJECT}"]  # noise jobs store no prompts

    messages = env.messages()
    assert len(messages) == 3
    for m in messages:
        assert m.raw["content-type"] == "application/json"
        assert m.task == TASK_NAME
        assert m.raw["properties"]["priority"] == celery_priority(9)
        assert m.body[1] == {}  # no kwargs: positional [job_id, shard_index] only
        assert m.raw["headers"]["ignore_result"] is True
    assert env.shard_args() == [(job.job_id, 0), (job.job_id, 1), (job.job_id, 2)]

    st = job.status()
    assert (st.state, st.num_shards, st.shards_queued, st.items_total, st.items_done) == ("queued", 3, 3, 2_500, 0)


def test_submit_txt2img_streams_prompts_into_chunks_that_decode_to_the_input(producer_env: ProducerEnv):
    env = producer_env
    prompts = [f"a handwritten {i % 10}, ünïcødé №{i}" for i in range(2_345)]
    job = env.client.submit(prompts=iter(prompts), images_per_prompt=3, output=env.output, shard_size=500,
                            prompt_chunk_size=1_000)
    spec = job.spec
    assert (spec.num_prompts, spec.total_items) == (2_345, 7_035)
    assert stored_prompts(env, spec) == prompts
    chunks = [k for k in env.stored_keys() if "/prompts/" in k]
    assert chunks == [f"runs/{job.job_id}/{prompt_chunk_key(c)}" for c in range(3)]
    assert env.shard_args() == [(job.job_id, s) for s in range(math.ceil(7_035 / 500))]


def _write_prompt_file(tmp: Path, fmt: str, prompts: list[str], column: str) -> Path:
    if fmt == "txt":
        path = tmp / "p.txt"
        path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    elif fmt == "jsonl":
        path = tmp / "p.jsonl"
        path.write_text("".join(json.dumps({column: p, "other": 1}) + "\n" for p in prompts), encoding="utf-8")
    elif fmt == "csv":
        import csv

        path = tmp / "p.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", column])
            w.writerows([i, p] for i, p in enumerate(prompts))
    else:
        path = tmp / "p.parquet"
        pq.write_table(pa.table({"id": list(range(len(prompts))), column: prompts}), path)
    return path


@pytest.mark.parametrize(("fmt", "column"), [("txt", None), ("jsonl", None), ("jsonl", "caption"), ("csv", None),
                                           ("csv", "caption"), ("parquet", None), ("parquet", "caption")])
def test_every_prompt_file_format_is_streamed_into_storage_unchanged(producer_env: ProducerEnv, tmp_path: Path,
                                                                    fmt: str, column: str | None):
    prompts = ["a handwritten 7", 'quotes " and, commas', "  leading spaces kept", "ελληνικά 数字 ✓"] * 40
    path = _write_prompt_file(tmp_path, fmt, prompts, column or "prompt")
    job = producer_env.client.submit(prompts=path, prompt_column=column, output=producer_env.output,
                                     prompt_chunk_size=64)
    assert job.spec.num_prompts == len(prompts)
    assert stored_prompts(producer_env, job.spec) == prompts
    assert len(producer_env.messages()) == 1


def test_prompt_format_option_overrides_the_file_suffix(producer_env: ProducerEnv, tmp_path: Path):
    path = tmp_path / "prompts.data"
    path.write_text('{"prompt": "one"}\n{"prompt": "two"}\n', encoding="utf-8")
    job = producer_env.client.submit(prompts=str(path), prompt_format="jsonl", output=producer_env.output)
    assert stored_prompts(producer_env, job.spec) == ["one", "two"]


def test_submit_to_a_file_url_stores_the_job_under_the_allowed_local_root(producer_env: ProducerEnv):
    env = producer_env
    root = env.spec_settings.local_output_root
    assert root is not None
    job = env.client.submit(prompts=["a", "b", "c"], output=f"file://{root}/run-1", prompt_chunk_size=2)
    job_dir = root / "run-1" / job.job_id
    assert JobSpec.from_json((job_dir / SPEC_OBJECT).read_bytes(), settings=env.spec_settings) == job.spec
    assert sorted(p.name for p in (job_dir / "prompts").iterdir()) == ["000000000.json", "000000001.json"]
    assert stored_prompts(env, job.spec) == ["a", "b", "c"]
    assert env.shard_args() == [(job.job_id, 0)]
    assert env.stored_keys() == []  # nothing went to S3


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.id for c in BAD_INPUTS])
def test_invalid_input_is_rejected_naming_the_field_with_nothing_stored_or_enqueued(
        shared_producer_env: ProducerEnv, tmp_path: Path, case: BadInput):
    env = shared_producer_env
    kwargs = case.build(tmp_path, env.output)
    with pytest.raises(ValidationError) as info:
        env.client.submit(**kwargs)
    assert info.value.field == case.field, str(info.value)
    assert str(info.value).startswith(f"{case.field}: ")
    assert len(str(info.value)) < 600  # a 1 MB prompt never lands in the message
    assert_nothing_stored_or_enqueued(env)
    root = env.spec_settings.local_output_root
    assert root is not None and list(root.iterdir()) == []


def test_invalid_prompt_deep_in_a_file_names_its_line_and_deletes_the_chunks_already_written(
        producer_env: ProducerEnv, tmp_path: Path):
    path = tmp_path / "p.txt"
    lines = [f"prompt {i}" for i in range(2_500)] + ["nul \x00 inside"] + ["after"] * 10
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        producer_env.client.submit(prompts=path, output=producer_env.output, prompt_chunk_size=100)
    assert info.value.field == "prompts"
    assert "line 2501" in str(info.value) and "U+0000" in str(info.value)
    assert_nothing_stored_or_enqueued(producer_env)


def test_too_many_prompts_for_the_shard_limit_is_caught_while_streaming(producer_env: ProducerEnv):
    from genimg.limits import MAX_SHARDS

    most = MAX_SHARDS // 64  # 64 images per prompt, one image per shard
    with pytest.raises(ValidationError) as info:
        producer_env.client.submit(prompts=(f"p{i}" for i in range(most + 1)), images_per_prompt=64,
                                   shard_size=1, output=producer_env.output, prompt_chunk_size=10_000)
    assert info.value.field == "shard_size"
    assert_nothing_stored_or_enqueued(producer_env)


def test_unreachable_redis_fails_the_submit_without_leaving_objects_or_printing_the_password(
        producer_env: ProducerEnv, caplog: pytest.LogCaptureFixture):
    env = producer_env
    client = Client("redis://:hunter2-secret@127.0.0.1:1/0", queue=env.queue, key_prefix=env.key_prefix,
                    storage=env.s3_settings, spec_settings=env.spec_settings)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(QueueUnavailableError) as info:
        client.submit(prompts=["a", "b"], output=env.output)
    client.close()
    assert "hunter2-secret" not in str(info.value) and "hunter2-secret" not in repr(client)
    assert "hunter2-secret" not in caplog.text
    assert env.stored_keys() == []  # chunks and job.json removed again


# --------------------------------------------------------------------------- idempotency


def test_same_idempotency_key_returns_the_same_job_and_enqueues_nothing_more(producer_env: ProducerEnv):
    env = producer_env
    first = env.client.submit(count=30, shard_size=10, output=env.output, idempotency_key="run-7/day-1")
    before = env.stored_keys()
    second = env.client.submit(count=30, shard_size=10, output=env.output, idempotency_key="run-7/day-1")
    assert second.job_id == first.job_id
    assert second.spec == first.spec
    assert len(env.messages()) == 3
    assert env.stored_keys() == before
    other = env.client.submit(count=30, shard_size=10, output=env.output, idempotency_key="run-7/day-2")
    assert other.job_id != first.job_id and len(env.messages()) == 6


def test_idempotency_key_after_redis_lost_the_job_returns_the_stored_job_without_enqueueing(
        producer_env: ProducerEnv):
    env = producer_env
    first = env.client.submit(count=30, shard_size=10, output=env.output, idempotency_key="k1")
    env.drain()
    env.forget_job(first.job_id)
    again = env.client.submit(count=30, shard_size=10, output=env.output, idempotency_key="k1")
    assert again.job_id == first.job_id
    assert again.spec.created_at == first.spec.created_at  # the stored spec, not a new one
    assert env.messages() == []
    assert env.client.job(first.job_id).spec == first.spec  # back in Redis


def test_an_idempotency_key_reused_with_a_different_spec_is_a_conflict_naming_the_key(producer_env: ProducerEnv):
    env = producer_env
    first = env.client.submit(count=30, shard_size=10, output=env.output, seed=1, idempotency_key="nightly-3")
    before = (env.stored_keys(), len(env.messages()))
    with pytest.raises(ConflictError, match=r"'nightly-3'.*seed 1 != 2") as info:
        env.client.submit(count=30, shard_size=10, output=env.output, seed=2, idempotency_key="nightly-3")
    assert info.value.key == "nightly-3" and first.job_id in str(info.value)
    assert (env.stored_keys(), len(env.messages())) == before  # nothing stored or enqueued
    env.forget_job(first.job_id)  # Redis lost the job: the stored job.json is compared instead
    with pytest.raises(ConflictError, match="count"):
        env.client.submit(count=40, shard_size=10, output=env.output, seed=1, idempotency_key="nightly-3")
    again = env.client.submit(count=30, shard_size=10, output=env.output, seed=1, idempotency_key="nightly-3")
    assert again.job_id == first.job_id


@pytest.mark.parametrize("seed", [1, 2])
def test_a_concurrent_submit_with_the_same_key_waits_for_the_first_to_store_its_spec_then_compares(
        producer_env: ProducerEnv, monkeypatch, seed: int):
    """The first submit holds the key while it still stores prompts; a second one with the same key must not
    return that job unchecked: it waits, then gets the job (same spec) or a conflict (another seed)."""
    env = producer_env
    storing, reading, gate = threading.Event(), threading.Event(), threading.Event()
    read_spec_json = jobs.read_spec_json

    def spying(*args, **kwargs):  # the second submit found the key claimed and looks for its spec
        reading.set()
        gate.set()  # only now may the first submit go on storing
        return read_spec_json(*args, **kwargs)

    monkeypatch.setattr(jobs, "read_spec_json", spying)

    def prompts():
        yield "a red circle"
        storing.set()  # the key is claimed (prompts are read while stored, after the claim)
        assert gate.wait(30)
        yield "a blue square"

    first: dict = {}
    t = threading.Thread(target=lambda: first.update(job=env.client.submit(
        prompts(), output=env.output, seed=1, shard_size=1, idempotency_key="race-1")))
    t.start()
    try:
        assert storing.wait(30)
        again = ["a red circle", "a blue square"]
        if seed == 1:
            job = env.client.submit(again, output=env.output, seed=1, shard_size=1, idempotency_key="race-1")
        else:
            with pytest.raises(ConflictError, match="seed 1 != 2"):
                env.client.submit(again, output=env.output, seed=2, shard_size=1, idempotency_key="race-1")
    finally:
        gate.set()
        t.join(60)
    assert reading.is_set() and "job" in first and first["job"].spec.num_prompts == 2
    if seed == 1:
        assert job.job_id == first["job"].job_id
    assert len(env.messages()) == 2  # the first submit's two shards, once


def test_an_idempotency_key_reused_with_other_prompts_is_a_conflict_and_stores_nothing(producer_env: ProducerEnv):
    # Field report (new-user walkthrough): the same key with other prompts returned the old job, silently.
    env = producer_env
    first = env.client.submit(["a seven", "a two"], shard_size=10, output=env.output, idempotency_key="p-1")
    assert first.spec.num_prompts == 2 and len(first.spec.prompts_sha256) == 64
    before = (env.stored_keys(), len(env.messages()))
    for other in (["a three", "a two"], ["a seven"], ["a seven", "a two", "a one"], ["a two", "a seven"]):
        with pytest.raises(ConflictError, match=r"'p-1'.*other prompts") as info:
            env.client.submit(other, shard_size=10, output=env.output, idempotency_key="p-1")
        assert info.value.key == "p-1"
        assert (env.stored_keys(), len(env.messages())) == before
    same = env.client.submit(iter(["a seven", "a two"]), shard_size=10, output=env.output, idempotency_key="p-1")
    assert same.job_id == first.job_id and len(env.messages()) == before[1]
    env.forget_job(first.job_id)  # Redis lost the job: the stored job.json's digest is compared
    with pytest.raises(ConflictError, match="other prompts"):
        env.client.submit(["a three", "a two"], shard_size=10, output=env.output, idempotency_key="p-1")
    assert env.client.submit(["a seven", "a two"], shard_size=10, output=env.output,
                             idempotency_key="p-1").job_id == first.job_id


def test_cli_submit_exits_2_naming_the_key_when_it_was_used_for_another_spec(producer_env: ProducerEnv):
    import os
    import subprocess
    import sys

    env = producer_env
    env.client.submit(count=5, shard_size=5, output=env.output, idempotency_key="cli-k")
    out = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--count", "6", "--output", env.output,
                          "--idempotency-key", "cli-k"], env={**os.environ, **env.env()}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "'cli-k'" in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_rejected_submit_releases_its_idempotency_key(producer_env: ProducerEnv):
    env = producer_env
    with pytest.raises(ValidationError):
        env.client.submit(prompts=["ok", "bad\x01"], output=env.output, idempotency_key="k2")
    assert_nothing_stored_or_enqueued(env)
    job = env.client.submit(prompts=["ok"], output=env.output, idempotency_key="k2")
    assert env.shard_args() == [(job.job_id, 0)]


# --------------------------------------------------------------------------- lifecycle


def test_status_counts_queued_running_done_and_failed_shards_and_items(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=40, shard_size=10, output=env.output)
    commit(env, job.spec, 0, failed=(3,))
    jobs.mark_running(env.redis, env.client.keys, job.job_id, 1, "w1")
    jobs.mark_failed(env.redis, env.client.keys, job.job_id, 2, "triton_unavailable")
    st = job.status()
    assert st.state == "running"
    assert (st.shards_done, st.shards_running, st.shards_failed, st.shards_queued) == (1, 1, 1, 1)
    assert (st.items_done, st.items_failed, st.items_total) == (9, 1, 40)
    assert st.to_dict()["state"] == "running"


def test_cancel_sets_the_state_cancelled_and_wait_returns_at_once(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=30, shard_size=10, output=env.output)
    st = job.cancel()
    assert st.state == "cancelled"
    assert jobs.is_cancelled(env.redis, env.client.keys, job.job_id)
    assert env.client.job(job.job_id).status().state == "cancelled"
    assert job.wait(progress=False, timeout_s=5, poll_s=0.05).state == "cancelled"


def test_cancel_leaves_a_finished_job_in_its_finished_state(producer_env: ProducerEnv):
    # Field report (new-user walkthrough): cancelling a succeeded job turned it into "cancelled".
    env = producer_env
    done = env.client.submit(count=20, shard_size=10, output=env.output)
    failed = env.client.submit(count=20, shard_size=10, output=env.output)
    for shard in (0, 1):
        commit(env, done.spec, shard)
        commit(env, failed.spec, shard, failed=(3,) if shard == 0 else ())
    assert (done.cancel().state, failed.cancel().state) == ("succeeded", "failed")
    assert not jobs.is_cancelled(env.redis, env.client.keys, done.job_id)
    assert env.client.job(done.job_id).status().state == "succeeded"


def test_resume_after_redis_loss_reenqueues_exactly_the_uncommitted_shards(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=47, shard_size=10, output=env.output)  # shards 0..4, the last of 7
    spec = job.spec
    commit(env, spec, 1)
    commit(env, spec, 3, failed=(31, 32))
    commit(env, spec, 4)
    env.drain()
    env.forget_job(job.job_id)  # FLUSHDB-style: spec, done-hash, everything of the job is gone
    with pytest.raises(JobNotFoundError):
        env.client.job(job.job_id)

    fresh = Client(env.redis_url, queue=env.queue, key_prefix=env.key_prefix, storage=env.s3_settings,
                   spec_settings=env.spec_settings)
    try:
        again = fresh.job(job.job_id, output=env.output)
        assert again.spec == spec
        assert again.resume() == 2
        assert env.shard_args() == [(job.job_id, 0), (job.job_id, 2)]
        done = {int(k): v.decode() for k, v in env.redis.hgetall(env.client.keys.job(job.job_id, "done")).items()}
        assert done == {1: "10,0", 3: "8,2", 4: "7,0"}
        st = again.status()
        assert (st.state, st.shards_done, st.shards_queued, st.items_done, st.items_failed) == ("running", 3, 2, 25, 2)
    finally:
        fresh.close()


def test_resume_clears_cancel_and_failure_records_and_requeues_only_uncommitted_shards(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=30, shard_size=10, output=env.output)
    commit(env, job.spec, 0)
    jobs.mark_failed(env.redis, env.client.keys, job.job_id, 1, "retries_exhausted")
    job.cancel()
    env.drain()
    assert job.resume() == 2
    assert env.shard_args() == [(job.job_id, 1), (job.job_id, 2)]
    st = job.status()
    assert (st.state, st.shards_done, st.shards_failed, st.shards_queued) == ("running", 1, 0, 2)


def test_resume_of_a_fully_committed_job_enqueues_nothing_and_writes_the_manifest(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=20, shard_size=10, output=env.output)
    commit(env, job.spec, 0)
    commit(env, job.spec, 1)
    env.drain()
    env.forget_job(job.job_id)
    assert job.resume() == 0
    assert env.messages() == []
    assert f"runs/{job.job_id}/manifest/part-00000.parquet" in env.stored_keys()
    assert job.status().state == "succeeded"


def test_wait_finalises_a_finished_job_that_no_worker_finalised(producer_env: ProducerEnv,
                                                                 capsys: pytest.CaptureFixture[str]):
    env = producer_env
    job = env.client.submit(prompts=["a", "b", "c"], images_per_prompt=5, shard_size=10, output=env.output)
    commit(env, job.spec, 0, failed=(4,))
    commit(env, job.spec, 1)
    st = job.wait(progress=True, timeout_s=20, poll_s=0.05)
    bar = capsys.readouterr().err
    assert "15/15" in bar and "img/s" in bar and "failed 1 items" in bar
    assert st.state == "failed"  # one failed item
    assert st.summary is not None and st.summary["items_ok"] == 14 and st.summary["items_failed"] == 1
    summary = json.loads(env.store.get_bytes(f"runs/{job.job_id}/{SUCCESS_OBJECT}"))
    assert summary["items_ok"] == 14
    table = job.manifest()
    assert table.column("item_index").to_pylist() == list(range(15))
    assert table.column("status").to_pylist().count("failed") == 1


def test_wait_raises_wait_timeout_while_shards_are_outstanding(producer_env: ProducerEnv):
    job = producer_env.client.submit(count=20, shard_size=10, output=producer_env.output)
    with pytest.raises(WaitTimeoutError):
        job.wait(progress=False, timeout_s=0.3, poll_s=0.05)


def test_manifest_of_a_running_job_holds_the_committed_shards_only(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=30, shard_size=10, output=env.output)
    commit(env, job.spec, 2)
    table = job.manifest()
    assert table.column("item_index").to_pylist() == list(range(20, 30))
    assert f"runs/{job.job_id}/manifest/part-00000.parquet" not in env.stored_keys()


def test_jobs_lists_the_most_recent_jobs_first(producer_env: ProducerEnv):
    env = producer_env
    ids = [env.client.submit(count=1, output=env.output, name=f"j{i}").job_id for i in range(3)]
    listed = env.client.jobs(limit=2)
    assert [j.job_id for j in listed] == ids[::-1][:2]
    assert [j.spec.name for j in listed] == ["j2", "j1"]


def test_client_job_rejects_a_malformed_job_id(producer_env: ProducerEnv):
    with pytest.raises(ValidationError) as info:
        producer_env.client.job("../../etc/passwd")
    assert info.value.field == "job_id"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cr3t-pw@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
    ("rediss://genimg:s3cr3t-pw@redis.internal/1", "rediss://genimg:***@redis.internal/1"),
    ("redis://redis.internal/0?password=s3cr3t-pw&db=1", "redis://redis.internal/0?password=***&db=1"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_redact_url_hides_the_password_of_a_redis_url(url: str, shown: str):
    from genimg.redaction import redact_url

    assert redact_url(url) == shown
    assert "s3cr3t-pw" not in repr(Client(url, storage=None))
