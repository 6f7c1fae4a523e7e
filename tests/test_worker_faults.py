"""Field failure cases (../shared/cases/README.md) against real workers, Redis, Triton and moto's S3.

C1 redelivery while running, C2 killed workers, C3 prefetch hoarding, C7
secrets in logs, C8 SIGTERM and too-short grace periods, C9 non-finite model
output (a second Triton serving poisoned generators), and flat worker memory.
Tests that shorten the visibility timeout or need Redis AUTH run on a
redis-server of their own (``pstack``, see tests/worker_support.py).
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from urllib.parse import urlsplit

import pytest

from genimg.queue import backlog
from genimg.shards import is_committed, read_shard_index
from producer import Client
from tests.fixtures.workers import wait_for
from tests.worker_support import (
    SLOW_SHARD_ITEMS,
    done_shards,
    hostname_of,
    pid_alive,
    private_redis,  # noqa: F401 - fixture
    pstack,  # noqa: F401 - fixture
    received,
    results,
    rss_bytes,
    running_shards,
    scrape,
    total,
    unacked_since,
)

SHORT_VISIBILITY = {  # C2/C8: a dead worker's shard comes back after 15 s; its shards run 2-5 s
    "GENIMG_VISIBILITY_TIMEOUT_S": 15, "GENIMG_TASK_HARD_TIME_LIMIT_S": 12, "GENIMG_TASK_SOFT_TIME_LIMIT_S": 10,
    "GENIMG_UNACKED_RESTORE_INTERVAL_S": 1,
}


def _slow_job(client: Client, bucket: str, name: str, shards: int = 1, items: int = SLOW_SHARD_ITEMS, **kw):
    """A noise2img job whose shards take seconds: upscaled, one item per Triton request."""
    return client.submit(count=items * shards, model="noise2img", output=f"s3://{bucket}/{name}", seed=101,
                         shard_size=items, sub_batch_size=1, **kw)


def _assert_each_item_once(client: Client, job, items: int) -> None:
    """The job succeeds, and its manifest and its shard indexes hold each item exactly once."""
    status = job.wait(progress=False, timeout_s=120, poll_s=0.2)
    assert status.state == "succeeded", status
    assert (status.items_done, status.items_failed) == (items, 0)
    table = job.manifest()
    assert table.column("item_index").to_pylist() == list(range(items))
    store, layout = client.job_store(job.spec)
    per_shard = [read_shard_index(store, layout, s).column("item_index").to_pylist()
                 for s in range(job.spec.shard_plan().num_shards)]
    assert sorted(i for rows in per_shard for i in rows) == list(range(items))


def _wait_running(stack, job_id: str, shard: int = 0, timeout_s: float = 60) -> str:
    """Poll until a worker has started ``shard``; returns its hostname."""
    return wait_for(lambda: running_shards(stack, job_id).get(shard), timeout_s, f"shard {shard} to start")


# --------------------------------------------------------------------------- C1


def _refusal(env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "GENIMG_REDIS_URL": "redis://127.0.0.1:1/0", "GENIMG_METRICS_PORT": "0", **env}
    return subprocess.run([sys.executable, "-m", "producer.cli", "worker"], env=full, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("visibility, hard, soft, backoff_max", [
    (45, 45, 40, 5),  # visibility == hard limit
    (30, 45, 40, 5),  # visibility < hard limit
    (60, 45, 40, 60),  # visibility == largest retry countdown
    (60, 45, 40, 90),  # visibility < largest retry countdown
], ids=["equal-to-hard-limit", "below-hard-limit", "equal-to-max-countdown", "below-max-countdown"])
def test_worker_refuses_to_start_unless_visibility_timeout_exceeds_hard_limit_and_max_countdown(
        visibility, hard, soft, backoff_max):
    proc = _refusal({"GENIMG_VISIBILITY_TIMEOUT_S": str(visibility), "GENIMG_TASK_HARD_TIME_LIMIT_S": str(hard),
                     "GENIMG_TASK_SOFT_TIME_LIMIT_S": str(soft), "GENIMG_RETRY_BACKOFF_MAX_S": str(backoff_max)})
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start" in proc.stderr
    assert f"GENIMG_VISIBILITY_TIMEOUT_S ({visibility})" in proc.stderr
    culprit = "GENIMG_TASK_HARD_TIME_LIMIT_S" if hard >= visibility else "GENIMG_RETRY_BACKOFF_MAX_S"
    assert culprit in proc.stderr


def test_worker_refuses_to_start_on_an_invalid_triton_protocol():
    proc = _refusal({"GENIMG_TRITON_PROTOCOL": "carrier-pigeon"})
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start" in proc.stderr and "GENIMG_TRITON_PROTOCOL" in proc.stderr


C1_ITEMS = 600
"""~4-7 s: well over the 1 s visibility timeout plus a 1 s restore sweep, so both workers generate it."""


@pytest.fixture
def versioned_bucket(s3_bucket, make_s3_store):
    """The test bucket with S3 versioning on (every overwrite kept); its versions deleted afterwards."""
    admin = make_s3_store()
    admin.client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    yield admin
    listing = admin.client.list_object_versions(Bucket=s3_bucket)
    for v in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
        admin.client.delete_object(Bucket=s3_bucket, Key=v["Key"], VersionId=v["VersionId"])


@pytest.mark.slow
def test_a_shard_redelivered_while_still_running_is_committed_once_with_byte_identical_items(
        pstack, s3_bucket, versioned_bucket):
    admin = versioned_bucket
    forced = {"GENIMG_CHECK_TIMING": "false", "GENIMG_VISIBILITY_TIMEOUT_S": 1,
              "GENIMG_UNACKED_RESTORE_INTERVAL_S": 1}
    workers = [pstack.start_worker(**forced), pstack.start_worker(**forced)]
    for w in workers:
        w.wait_ready()
    with Client() as client:
        job = _slow_job(client, s3_bucket, "c1", items=C1_ITEMS)
        store, layout = client.job_store(job.spec)

        def runs() -> list[dict]:
            return [r for w in workers for _, _, r in results(w.log()) if r.get("job_id") == job.job_id]

        # Each worker generates it (1 s visibility < shard time); a later delivery finds it committed.
        wait_for(lambda: sum(r["status"] == "committed" for r in runs()) >= 2, 90, "the shard to run twice")
        wait_for(lambda: not backlog(pstack.redis, pstack.env["GENIMG_QUEUE"]).total, 30, "redeliveries to stop")
        task_ids = [set(received(w.log())) for w in workers]
        assert task_ids[0] == task_ids[1] and len(task_ids[0]) == 1  # one message, delivered to both
        _assert_each_item_once(client, job, C1_ITEMS)
        generated = sum(r["status"] == "committed" for r in runs())
        versions = admin.client.list_object_versions(Bucket=s3_bucket, Prefix=layout.tar_key(0))["Versions"]
        assert len(versions) == generated >= 2
        tars = {admin.client.get_object(Bucket=s3_bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
                for v in versions}
        assert len(tars) == 1  # every run wrote the same bytes
    scraped = [scrape(w.metrics_port) for w in workers]
    assert sum(total(s, "genimg_stage_seconds_count", stage="shard") for s in scraped) == generated
    assert sum(total(s, "genimg_images_written_total") for s in scraped) == C1_ITEMS  # counted once
    assert sum(total(s, "genimg_shards_committed_total") for s in scraped) == 1


# --------------------------------------------------------------------------- C2


def test_a_pool_child_killed_mid_shard_is_redelivered_at_once_and_each_item_is_written_once(pstack, s3_bucket):
    worker = pstack.start_worker(GENIMG_CONCURRENCY=1)  # visibility timeout 60 s
    worker.wait_ready()
    with Client() as client:
        job = _slow_job(client, s3_bucket, "c2-child")
        store, layout = client.job_store(job.spec)
        _wait_running(pstack, job.job_id)
        [task_id] = received(worker.log())
        [child] = worker.children()
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        assert not is_committed(store, layout, 0)
        wait_for(lambda: received(worker.log()).count(task_id) == 2, 10, "the shard to be redelivered")
        assert time.monotonic() - killed < 10  # at once, not after the 60 s visibility timeout
        assert "WorkerLostError" in worker.log()
        _assert_each_item_once(client, job, SLOW_SHARD_ITEMS)


@pytest.mark.slow
def test_a_worker_main_process_killed_mid_shard_gets_its_shard_back_within_the_visibility_timeout(
        pstack, s3_bucket):
    first = pstack.start_worker(**SHORT_VISIBILITY)
    first.wait_ready()
    with Client() as client:
        job = _slow_job(client, s3_bucket, "c2-main")
        store, layout = client.job_store(job.spec)
        _wait_running(pstack, job.job_id)
        [task_id] = received(first.log())
        children = first.children()
        first.proc.kill()  # SIGKILL of the main process only
        first.proc.wait(10)
        wait_for(lambda: not any(pid_alive(p) for p in children), 10, "the pool child to die with its parent")
        assert not is_committed(store, layout, 0)
        taken_at = unacked_since(pstack.redis, pstack.env["GENIMG_QUEUE"], task_id)
        assert taken_at is not None  # Redis still holds it as delivered, not acknowledged
        replacement = pstack.start_worker(**SHORT_VISIBILITY)
        wait_for(lambda: task_id in received(replacement.log()), 40, "the replacement to get the shard")
        back_after = time.time() - taken_at
        assert 15 <= back_after <= 15 + 10, back_after  # restored once the visibility timeout had passed
        _assert_each_item_once(client, job, SLOW_SHARD_ITEMS)


# --------------------------------------------------------------------------- C3


class _BacklogSampler(threading.Thread):
    """Samples the queue's waiting and reserved (unacked) shard counts every 20 ms."""

    def __init__(self, client, queue: str) -> None:
        super().__init__(daemon=True)
        self.client, self.queue = client, queue
        self.samples: list[tuple[float, int, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            b = backlog(self.client, self.queue)
            self.samples.append((time.monotonic(), b.waiting, b.reserved))
            self.halt.wait(0.02)

    def max_reserved(self, since: float = 0.0, until: float = float("inf")) -> int:
        return max(r for t, _, r in self.samples if since <= t <= until)


@pytest.mark.slow
def test_four_shards_on_two_single_process_workers_run_two_each_without_hoarding(pstack, s3_bucket):
    from celery import Celery

    from genimg.settings import WorkerSettings
    from genimg.queue import celery_config

    queue = pstack.env["GENIMG_QUEUE"]
    a = pstack.start_worker(GENIMG_CONCURRENCY=1)
    # B is started in advance, idle on a queue of its own, so that "B starts one second later"
    # is B starting to consume (add_consumer), not B's Python start-up time.
    b = pstack.start_worker(GENIMG_CONCURRENCY=1, GENIMG_QUEUE=f"{queue}-parked")
    a.wait_ready()
    b.wait_ready()
    control = Celery("control")
    control.conf.update(celery_config(WorkerSettings()))
    sampler = _BacklogSampler(pstack.redis, queue)
    sampler.start()
    try:
        with Client() as client:
            t0 = time.monotonic()
            job = _slow_job(client, s3_bucket, "c3", shards=4, items=400)
            _wait_running(pstack, job.job_id)
            alone = backlog(pstack.redis, queue)
            a_alone_until = time.monotonic()
            replies = control.control.add_consumer(queue, destination=[hostname_of(b)], reply=True, timeout=10)
            assert replies and "ok" in next(iter(replies[0].values()))
            status = job.wait(progress=False, timeout_s=90, poll_s=0.1)
            wall = time.monotonic() - t0
    finally:
        sampler.halt.set()
        sampler.join()
        control.close()
    assert status.state == "succeeded", status
    ran = {name: [r["shard"] for _, _, r in results(w.log()) if r.get("job_id") == job.job_id]
           for name, w in (("A", a), ("B", b))}
    assert sorted(ran["A"] + ran["B"]) == [0, 1, 2, 3]
    assert (len(ran["A"]), len(ran["B"])) == (2, 2), ran
    runtimes = {name: [secs for _, secs, r in results(w.log()) if r.get("job_id") == job.job_id]
                for name, w in (("A", a), ("B", b))}
    longest = max(max(v) for v in runtimes.values())
    # "4 shards of 5 s: wall time under 12 s", with 5 s read as the longest shard seen here (two
    # workers share two cores and one Triton, so a shard takes 3-7 s); hoarding would take 4 shards.
    assert wall < 2 * longest + 2.0, (wall, runtimes)
    # A alone held only the shard it ran: the other three stayed in Redis for B.
    assert (alone.waiting, alone.reserved) == (3, 1)
    assert sampler.max_reserved(until=a_alone_until) == 1
    # Two workers of one process each never held more than the two shards they ran.
    assert sampler.max_reserved() <= 2


# --------------------------------------------------------------------------- C8


def test_sigterm_mid_shard_finishes_and_commits_that_shard_takes_no_other_and_exits_0(pstack, s3_bucket):
    worker = pstack.start_worker(GENIMG_CONCURRENCY=1)
    worker.wait_ready()
    with Client() as client:
        job = _slow_job(client, s3_bucket, "c8-warm", shards=3, items=300)
        store, layout = client.job_store(job.spec)
        _wait_running(pstack, job.job_id)
        assert not is_committed(store, layout, 0)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0
        assert "Warm shutdown" in worker.log()
        assert is_committed(store, layout, 0)
        assert [is_committed(store, layout, s) for s in (1, 2)] == [False, False]
        assert list(done_shards(pstack, job.job_id)) == [0]
        assert running_shards(pstack, job.job_id) == {}
        assert len(received(worker.log())) == 1
        left = backlog(pstack.redis, pstack.env["GENIMG_QUEUE"])
        assert (left.waiting, left.reserved) == (2, 0)  # nothing taken, nothing held


@pytest.mark.slow
def test_sigkill_after_a_too_short_grace_period_redelivers_the_shard_to_another_worker(pstack, s3_bucket):
    first = pstack.start_worker(**SHORT_VISIBILITY)
    first.wait_ready()
    with Client() as client:
        job = _slow_job(client, s3_bucket, "c8-grace")
        store, layout = client.job_store(job.spec)
        _wait_running(pstack, job.job_id)
        [task_id] = received(first.log())
        first.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "Warm shutdown" in first.log(), 10, "the warm shutdown to begin")
        os.killpg(first.proc.pid, signal.SIGKILL)  # the grace period is over: every process of the pod
        first.proc.wait(10)
        assert not is_committed(store, layout, 0)
        second = pstack.start_worker(**SHORT_VISIBILITY)
        wait_for(lambda: task_id in received(second.log()), 40, "another worker to get the shard")
        _assert_each_item_once(client, job, SLOW_SHARD_ITEMS)
        assert [r["status"] for _, _, r in results(second.log())] == ["committed"]


# --------------------------------------------------------------------------- C7

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY000001", "AWS_SESSION_TOKEN": "SESSION-TOKEN-XYZ",
                    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}


def _redis_dump(client) -> str:
    """Every key and value of a Redis database, as text."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        value = {"string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
                 "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1)}[kind](key)
        out.append(f"{key!r} {value!r}")
    return "\n".join(out)


def _tar_json_members(store, layout, shards: int) -> str:
    texts = []
    for shard in range(shards):
        with tarfile.open(fileobj=io.BytesIO(store.get_bytes(layout.tar_key(shard)))) as tf:
            texts += [tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".json")]
    return "\n".join(texts)


def test_no_credential_or_signature_reaches_logs_results_or_metadata_at_debug_level(
        pstack, private_redis, s3_bucket, caplog, capfd, monkeypatch):
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    worker = pstack.start_worker(GENIMG_LOG_LEVEL="DEBUG", **FAKE_CREDENTIALS)
    worker.wait_ready()
    caplog.set_level(logging.DEBUG)
    with Client() as client:
        job = client.submit(["a handwritten 3", "a handwritten 8"], images_per_prompt=2, shard_size=2, seed=3,
                            upscale=False, output=f"s3://{s3_bucket}/c7")
        status = job.wait(progress=False, timeout_s=90, poll_s=0.2)
        manifest = job.manifest()
        store, layout = client.job_store(job.spec)
        metadata = _tar_json_members(store, layout, 2)
    assert worker.stop(signal.SIGTERM) == 0
    assert status.state == "succeeded", status
    captured = capfd.readouterr()
    places = {
        "worker log": worker.log(),
        "producer log": caplog.text + "\n".join(r.getMessage() for r in caplog.records),
        "producer stdout/stderr": captured.out + captured.err,
        "redis (task results, job records)": _redis_dump(pstack.redis),
        "item metadata": metadata,
        "manifest": str(manifest.to_pylist()),
    }
    password = urlsplit(private_redis).password
    for secret in (*FAKE_CREDENTIALS.values(), password, "Signature="):
        for where, text in places.items():
            assert secret not in text, f"{secret!r} appears in the {where}"
    # Not vacuous: both sides logged signed S3 requests and Redis traffic at DEBUG.
    assert "DEBUG botocore" in worker.log() and "celery.worker.strategy" in worker.log()
    assert any(r.name.startswith("botocore") and r.levelno == logging.DEBUG for r in caplog.records)
    assert "<redacted" in worker.log() + caplog.text


_CELERY_LOGGING_PROBE = """
import logging
from celery.utils.log import get_multiprocessing_logger, get_task_logger
from workers.app import app
app.log.setup(logging.DEBUG)  # what a Celery worker does at start: it installs handlers of its own
line = "Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEY000001/x, SignedHeaders=host, Signature=0a1b"
for logger in (logging.getLogger("genimg.probe"), get_task_logger("genimg.probe"), get_multiprocessing_logger()):
    logger.error(line)
    logger.error("connected with password %s", "pw-probe-0123456789")
"""


def test_every_handler_celery_installs_in_a_worker_redacts_signatures_and_the_redis_password():
    env = {**os.environ, "GENIMG_REDIS_URL": "redis://:pw-probe-0123456789@127.0.0.1:1/0"}
    proc = subprocess.run([sys.executable, "-c", _CELERY_LOGGING_PROBE], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "Authorization:" in ln or "connected with" in ln]
    assert len(lines) == 6, proc.stderr  # root, celery.task and multiprocessing handlers, two lines each
    for secret in ("AKIAEXAMPLEKEY000001", "Signature=", "pw-probe-0123456789"):
        assert secret not in proc.stderr
    assert all("<redacted>" in ln for ln in lines)


# --------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_worker_resident_memory_grows_less_than_50_mb_from_shard_10_to_shard_200(stack, s3_bucket):
    worker = stack.start_worker(GENIMG_CONCURRENCY=1)
    worker.wait_ready()
    [child] = worker.children()

    def rss_after(shards: int) -> tuple[int, int]:
        wait_for(lambda: len(done_shards(stack, job.job_id)) >= shards, 100, f"{shards} shards", interval_s=0.02)
        return rss_bytes(child), rss_bytes(worker.proc.pid)

    with Client() as client:
        # 210 tiny shards: both readings are taken while shards are still flowing (the job's one-off
        # manifest build at the end is not a per-shard cost).
        job = client.submit(count=420, model="noise2img", output=f"s3://{s3_bucket}/mem", seed=9, shard_size=2,
                            upscale=False)
        after_10, after_200 = rss_after(10), rss_after(200)
        status = job.wait(progress=False, timeout_s=60, poll_s=0.2)
    assert status.state == "succeeded" and status.shards_done == 210, status
    assert worker.children() == [child]  # the same pool process ran every shard
    growth_mb = [(b - a) / 2**20 for a, b in zip(after_10, after_200)]
    assert growth_mb[0] < 50, f"pool child grew {growth_mb[0]:.1f} MB"
    assert growth_mb[1] < 50, f"main process grew {growth_mb[1]:.1f} MB"


# --------------------------------------------------------------------------- C9

C9_SEED = 77
C9_POISON = {1: "nan", 2: "one_percent_nan", 5: "one_inf", 6: "black"}
"""noise2img item index -> what the poisoned generator does to that item's image (float, before uint8)."""
C9_FAILED = [1, 2, 5]


def _export_poisoned_generators(onnx_dir, keys: list[float]) -> None:
    """Replace ``generator.onnx`` (txt2img: last layer's bias NaN, so every image is all-NaN) and
    ``generator_uncond.onnx`` (noise2img: poisoned only for the items whose ``Z[0]`` is in ``keys``)."""
    import torch
    from torch import nn

    from genimg.models.export import OPSET
    from genimg.models.nets import COND_DIM, Generator, GeneratorForExport, to_uint8

    class PerItemPoison(nn.Module):
        """The serving form ``Z`` -> ``IMAGE`` uint8, ``FINITE`` of a generator whose float output is
        all-NaN / 1 % NaN / one +inf / exactly -1 (black) for the items keyed by ``Z[0]``."""

        def __init__(self) -> None:
            super().__init__()
            self.gen = Generator()
            self.register_buffer("keys", torch.tensor(keys, dtype=torch.float32).view(1, -1))
            pct = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
            pct.view(-1)[::100] = True  # 8 of 784 pixels
            one = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
            one[0, 0, 13, 14] = True
            self.register_buffer("pct", pct)
            self.register_buffer("one", one)

        def forward(self, z):
            x = self.gen(z, torch.zeros(z.shape[0], COND_DIM))
            hit = (z[:, :1] == self.keys).view(-1, 4, 1, 1)
            x = torch.where(hit[:, 3:4], torch.full_like(x, -1.0), x)
            x = torch.where(hit[:, 0:1] | (hit[:, 1:2] & self.pct), torch.full_like(x, float("nan")), x)
            x = torch.where(hit[:, 2:3] & self.one, torch.full_like(x, float("inf")), x)
            finite = torch.isfinite(x).flatten(1).all(dim=1, keepdim=True)  # as the real export computes it
            return to_uint8(x, -1.0, 1.0).permute(0, 2, 3, 1), finite

    def export(module, args, name: str, inputs: list[str]) -> None:
        names = inputs + ["IMAGE", "FINITE"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own chatter
            torch.onnx.export(module.eval(), args, str(onnx_dir / name), input_names=inputs,
                              output_names=["IMAGE", "FINITE"], dynamic_axes={n: {0: "batch"} for n in names},
                              opset_version=OPSET, dynamo=False)

    torch.manual_seed(0)
    nan_bias = Generator()
    with torch.no_grad():
        nan_bias.up2.bias.fill_(float("nan"))
    export(GeneratorForExport(nan_bias), (torch.randn(2, 100), torch.randn(2, COND_DIM)), "generator.onnx",
           ["Z", "COND"])
    export(PerItemPoison(), (torch.randn(2, 100),), "generator_uncond.onnx", ["Z"])


@pytest.fixture(scope="module")
def poisoned_triton(triton_onnx_dir, tmp_path_factory):
    """A second tritonserver (this module only) whose generators are poisoned (see above)."""
    import shutil

    import numpy as np

    from genimg.seeds import batch_noise
    from genimg.triton.repo import build_repository
    from genimg.triton.server import TritonServer

    base = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(triton_onnx_dir, base / "onnx")
    z0 = batch_noise(C9_SEED, range(12))[:, 0]
    assert len(np.unique(z0)) == 12  # each poisoned item is told apart by its Z[0] alone
    _export_poisoned_generators(base / "onnx", [float(z0[i]) for i in C9_POISON])
    server = TritonServer(build_repository(base / "repo", "cpu", base / "onnx"), exit_timeout_s=5)
    server.start()
    try:
        server.wait_ready(timeout_s=180)
        yield server
    finally:
        server.stop()


def _inference_count(server, model: str) -> float:
    """Items Triton has run through ``model`` (``nv_inference_count``)."""
    samples = scrape(server.ports["metrics"])  # the parser names a counter's samples *_total
    return total(samples, "nv_inference_count_total", model=model) + total(samples, "nv_inference_count", model=model)


def _tar_names(store, layout, shard: int) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(layout.tar_key(shard)))) as tf:
        return tf.getnames()


@pytest.mark.slow
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_non_finite_items_are_retried_once_then_recorded_failed_unwritten_and_counted_and_black_is_kept(
        stack, s3_bucket, poisoned_triton):
    import numpy as np

    from genimg.imaging import decode
    from genimg.pipeline import Infer, run_shard
    from genimg.layout import Layout
    from genimg.triton.client import InferenceClient

    worker = stack.start_worker(GENIMG_TRITON_URL=poisoned_triton.urls["grpc"], PYTHONWARNINGS="error::RuntimeWarning")
    worker.wait_ready()
    before = _inference_count(poisoned_triton, "generator_uncond")
    with Client() as client:
        job = client.submit(count=12, model="noise2img", seed=C9_SEED, shard_size=4, sub_batch_size=4, upscale=False,
                            output=f"s3://{s3_bucket}/c9")
        status = job.wait(progress=False, timeout_s=90, poll_s=0.2)
        store, layout = client.job_store(job.spec)
        manifest = job.manifest().to_pylist()
        names = [n for s in range(3) for n in _tar_names(store, layout, s)]
        black = decode(_member(store, layout, 1, "000000006.png"))
        # The same shard computed here, with numpy warnings as errors: same failures, same bytes.
        with InferenceClient(poisoned_triton.urls["grpc"], "grpc") as triton:
            again = Layout(bucket=layout.bucket, prefix="c9-in-process", job_id=job.job_id)
            result = run_shard(job.spec, 1, store=store, layout=again, infer=Infer(triton))
        assert store.get_bytes(again.tar_key(1)) == store.get_bytes(layout.tar_key(1))
    assert result.failed_by_reason == {"non_finite_output": 1} and result.items_ok == 3
    # 12 items once, and the 3 non-finite ones once more (the in-process run adds shard 1's 4 + 1).
    assert _inference_count(poisoned_triton, "generator_uncond") - before == 12 + 3 + 4 + 1
    assert status.state == "failed", status
    assert (status.shards_done, status.shards_failed, status.items_done, status.items_failed) == (3, 0, 9, 3)
    assert status.summary["items_failed_by_reason"] == {"non_finite_output": 3}
    failed = [(r["item_index"], r["reason"], r["tar_key"], r["sha256"]) for r in manifest if r["status"] != "ok"]
    assert failed == [(i, "non_finite_output", None, None) for i in C9_FAILED]
    assert not [n for n in names if int(n.split(".")[0]) in C9_FAILED]  # no file for a failed item
    assert len(names) == 2 * 9  # an image and its JSON for each of the other 9
    assert black.shape == (28, 28, 1) and not black.any()  # the black image is a valid, stored image
    assert all(r["status"] == "ok" for r in manifest if r["shard_index"] == 2)
    samples = scrape(worker.metrics_port)
    assert total(samples, "genimg_items_failed_total", reason="non_finite_output") == 3
    assert total(samples, "genimg_images_written_total") == 9
    assert "RuntimeWarning" not in worker.log()


def _member(store, layout, shard: int, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(layout.tar_key(shard)))) as tf:
        return tf.extractfile(name).read()


@pytest.mark.slow
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_an_all_nan_generator_fails_every_item_as_non_finite_output_and_writes_no_image(
        stack, s3_bucket, poisoned_triton):
    worker = stack.start_worker(GENIMG_TRITON_URL=poisoned_triton.urls["grpc"], PYTHONWARNINGS="error::RuntimeWarning")
    worker.wait_ready()
    before = _inference_count(poisoned_triton, "generator")
    with Client() as client:
        job = client.submit(["a handwritten 4", "a handwritten 9"], images_per_prompt=3, seed=5, shard_size=3,
                            upscale=True, output=f"s3://{s3_bucket}/c9-nan")
        status = job.wait(progress=False, timeout_s=90, poll_s=0.2)
        store, layout = client.job_store(job.spec)
        manifest = job.manifest().to_pylist()
        names = [n for s in range(2) for n in _tar_names(store, layout, s)]
    assert status.state == "failed", status
    assert (status.shards_done, status.shards_failed, status.items_done, status.items_failed) == (2, 0, 0, 6)
    assert status.summary["items_failed_by_reason"] == {"non_finite_output": 6}
    assert {(r["status"], r["reason"]) for r in manifest} == {("failed", "non_finite_output")}
    assert names == []
    assert _inference_count(poisoned_triton, "generator") - before == 2 * 6  # each item tried twice
    samples = scrape(worker.metrics_port)
    assert total(samples, "genimg_items_failed_total", reason="non_finite_output") == 6
    assert total(samples, "genimg_images_written_total") == 0
    assert "RuntimeWarning" not in worker.log()
