"""The ``genimg`` producer commands against real Redis and a real S3 API (moto's server); no workers.

Most tests run the Typer app in-process (``CliRunner``) with the test's
``GENIMG_*`` environment; two run the real entry point in a subprocess to
check exit codes and that a Redis password never reaches the terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from genimg import jobs
from genimg.spec import JobSpec
from producer.cli import app
from tests.fixtures.producer import ProducerEnv, commit_synthetic_shard as commit
from tests.producer_cases import BAD_INPUTS, BadInput, cli_args

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


def run(env: ProducerEnv, *args: str, extra_env: dict[str, str] | None = None):
    runner = CliRunner()
    return runner.invoke(app, list(args), env={**env.env(), **(extra_env or {})}, catch_exceptions=False)


def test_submit_json_prints_the_job_and_enqueues_one_message_per_shard(producer_env: ProducerEnv):
    env = producer_env
    res = run(env, "submit", "--count", "2500", "--shard-size", "1000", "--output", env.output, "--seed", "9",
              "--name", "cli-1", "--dedup", "near", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["model"], doc["total_items"], doc["num_shards"]) == ("noise2img", 2500, 3)
    spec = JobSpec.from_json(env.store.get_bytes(f"runs/{doc['job_id']}/job.json"))
    assert (spec.seed, spec.name, spec.count, spec.dedup) == (9, "cli-1", 2500, "near")
    assert env.shard_args() == [(doc["job_id"], s) for s in range(3)]


def test_submit_reads_repeated_prompt_options_and_prompt_files(producer_env: ProducerEnv, tmp_path: Path):
    env = producer_env
    res = run(env, "submit", "--prompt", "a handwritten 7", "--prompt", "a zero", "--images-per-prompt", "4",
              "--output", env.output, "--json")
    assert res.exit_code == 0, res.stderr
    assert JobSpec.from_json(env.redis.get(env.client.keys.job(json.loads(res.stdout)["job_id"], "spec"))
                             ).total_items == 8
    path = tmp_path / "p.csv"
    path.write_text("caption,id\nseven,1\nzero,2\nnine,3\n", encoding="utf-8")
    res = run(env, "submit", "--prompts", str(path), "--prompt-column", "caption", "--output", env.output)
    assert res.exit_code == 0, res.stderr
    job_id = res.stdout.strip()
    assert env.client.job(job_id).spec.num_prompts == 3


def test_submit_options_fall_back_to_genimg_environment_variables(producer_env: ProducerEnv):
    env = producer_env
    res = run(env, "submit", "--count", "50", "--json",
              extra_env={"GENIMG_OUTPUT": env.output, "GENIMG_SHARD_SIZE": "20", "GENIMG_IMAGE_FORMAT": "webp",
                         "GENIMG_PRIORITY": "high", "GENIMG_MODEL": "noise2img"})
    assert res.exit_code == 0, res.stderr
    spec = env.client.job(json.loads(res.stdout)["job_id"]).spec
    assert (spec.output, spec.shard_size, spec.image_format, spec.priority) == (env.output, 20, "webp", 9)
    assert len(env.messages()) == 3


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.id for c in BAD_INPUTS])
def test_invalid_input_exits_2_naming_the_field_with_nothing_stored_or_enqueued(
        shared_producer_env: ProducerEnv, tmp_path: Path, case: BadInput):
    env = shared_producer_env
    res = run(env, "submit", *cli_args(case.build(tmp_path, env.output)))
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert f"invalid {case.field}:" in res.stderr, res.stderr
    assert res.stdout == ""
    assert len(res.stderr) < 1_000
    assert env.stored_keys() == [] and env.messages() == [] and env.redis_keys() == []


def test_submit_wait_exits_1_when_the_job_ends_failed_and_0_when_it_succeeds(producer_env: ProducerEnv):
    env = producer_env
    good = env.client.submit(count=10, shard_size=10, output=env.output)
    bad = env.client.submit(count=20, shard_size=10, output=env.output)
    commit(env, good.spec, 0)
    commit(env, bad.spec, 0)
    jobs.mark_failed(env.redis, env.client.keys, bad.job_id, 1, "retries_exhausted: triton_unavailable")
    ok = run(env, "wait", good.job_id, "--no-progress", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["state"] == "succeeded"
    failed = run(env, "wait", bad.job_id, "--no-progress", "--json")
    assert failed.exit_code == 1, failed.stderr
    doc = json.loads(failed.stdout)
    assert (doc["state"], doc["shards_failed"], doc["items_done"]) == ("failed", 1, 10)
    assert doc["summary"]["failed_shards"] == {"1": "retries_exhausted: triton_unavailable"}


def test_wait_with_a_timeout_exits_124_and_leaves_the_job_running(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=10, output=env.output)
    res = run(env, "wait", job.job_id, "--timeout-s", "0.2", "--no-progress")
    assert res.exit_code == 124
    assert job.status().state == "queued"


def test_status_cancel_resume_and_ls_print_json_for_scripts(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=30, shard_size=10, output=env.output, name="scripted")
    commit(env, job.spec, 0)

    st = run(env, "status", job.job_id, "--json")
    assert st.exit_code == 0, st.stderr
    assert {k: json.loads(st.stdout)[k] for k in ("state", "shards_done", "items_done")} == \
        {"state": "running", "shards_done": 1, "items_done": 10}

    cancelled = run(env, "cancel", job.job_id, "--json")
    assert cancelled.exit_code == 0 and json.loads(cancelled.stdout)["state"] == "cancelled"

    env.drain()
    resumed = run(env, "resume", job.job_id, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["enqueued"] == 2 and doc["status"]["state"] == "running"
    assert env.shard_args() == [(job.job_id, 1), (job.job_id, 2)]

    listed = run(env, "ls", "--json", "--limit", "5")
    assert listed.exit_code == 0
    assert [(d["job_id"], d["name"]) for d in json.loads(listed.stdout)] == [(job.job_id, "scripted")]
    human = run(env, "status", job.job_id)
    assert job.job_id in human.stdout and "running" in human.stdout


def test_resume_with_output_finds_a_job_redis_has_lost(producer_env: ProducerEnv):
    env = producer_env
    job = env.client.submit(count=30, shard_size=10, output=env.output)
    commit(env, job.spec, 1)
    env.drain()
    env.forget_job(job.job_id)
    lost = run(env, "resume", job.job_id)
    assert lost.exit_code == 2 and "unknown to Redis" in lost.stderr
    res = run(env, "resume", job.job_id, "--output", env.output)
    assert res.exit_code == 0, res.stderr
    assert env.shard_args() == [(job.job_id, 0), (job.job_id, 2)]


def test_manifest_writes_the_committed_rows_to_a_local_parquet_file(producer_env: ProducerEnv, tmp_path: Path):
    env = producer_env
    job = env.client.submit(count=20, shard_size=10, output=env.output)
    commit(env, job.spec, 0)
    commit(env, job.spec, 1, failed=(12,))
    out = tmp_path / "m.parquet"
    res = run(env, "manifest", job.job_id, "--out", str(out), "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["rows"] == 20
    table = pq.read_table(out)
    assert table.column("item_index").to_pylist() == list(range(20))
    assert table.column("status").to_pylist().count("failed") == 1
    bad = run(env, "manifest", job.job_id, "--out", str(tmp_path / "m.xlsx"))
    assert bad.exit_code == 2 and "invalid out:" in bad.stderr


def test_unknown_or_malformed_job_ids_exit_2(producer_env: ProducerEnv):
    assert run(producer_env, "status", "0" * 32).exit_code == 2
    res = run(producer_env, "cancel", "not-a-job")
    assert res.exit_code == 2 and "invalid job_id:" in res.stderr


@pytest.mark.parametrize("command", ["submit", "status", "wait", "cancel", "resume", "manifest", "ls"])
def test_every_command_help_shows_an_example(command: str):
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0
    assert f"Example: genimg {command}" in res.stdout


def test_entry_point_exit_codes_and_redis_password_never_printed(producer_env: ProducerEnv):
    env = producer_env
    secret = "hunter2-cli-secret"
    base = {**os.environ, **env.env(), "GENIMG_LOG_LEVEL": "DEBUG"}
    cmd = [sys.executable, "-m", "producer.cli", "submit", "--count", "5", "--output", env.output]

    bad = subprocess.run([*cmd[:-4], "--count", "0", "--output", env.output],
                         env={**base, "GENIMG_REDIS_URL": f"redis://:{secret}@127.0.0.1:6379/0"},
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "invalid count:" in bad.stderr

    down = subprocess.run(cmd, env={**base, "GENIMG_REDIS_URL": f"redis://:{secret}@127.0.0.1:1/0"},
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert down.returncode == 3, down.stderr
    assert "QueueUnavailableError" in down.stderr
    assert secret not in down.stderr + down.stdout
    assert env.stored_keys() == []


def test_sigterm_mid_submit_deletes_what_it_stored_releases_its_key_and_exits_143(
        producer_env: ProducerEnv, tmp_path: Path):
    """SIGTERM (Kubernetes, CI runners, ``timeout``) while a submit stores its prompts unwinds like Ctrl-C: a
    break-it run found 120 prompt objects left behind and the idempotency key held for an hour, so a retry
    with the same key waited 120 s and failed."""
    import signal
    import time

    env = producer_env
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"a picture of the digit {i % 10}, variant {i}\n" for i in range(400_000)))
    base = {**os.environ, **env.env()}
    cmd = [sys.executable, "-m", "producer.cli", "submit", "--prompts", str(prompts), "--prompt-chunk-size", "100",
           "--output", env.output, "--idempotency-key", "sigterm-1"]
    proc = subprocess.Popen(cmd, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 40
    while not env.stored_keys() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # polling storage for the first stored chunk
    assert proc.poll() is None and env.stored_keys(), "the submit finished or stored nothing before the signal"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "submit terminated (SIGTERM)" in err
    assert env.stored_keys() == [] and env.shard_args() == []
    again = run(env, "submit", "--count", "5", "--output", env.output, "--idempotency-key", "sigterm-1", "--json")
    assert again.exit_code == 0, again.stderr  # the key was released: no wait, no conflict
