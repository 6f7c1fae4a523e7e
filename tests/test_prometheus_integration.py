"""A real Prometheus scraping a real stack (two workers, ``genimg exporter``, Triton) through one small job.

The job has six shards of four txt2img items; before any worker starts, the
stored prompt chunks of shards 1 and 4 are deleted, so those two shards fail
permanently (``StorageNotFoundError``) and the other four commit. Prometheus
runs deploy/prometheus/prometheus.yml (targets replaced, a 250 ms scrape and a
1 s rule evaluation interval) with deploy/prometheus/rules.yml. A thread records when each shard
was first seen done or failed in Redis, to compare with the backlog series.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pytest
import redis

from genimg.inputs import prompt_chunk_key
from genimg.jobs import Keys
from genimg.stores.s3 import S3Store
from producer import Client
from tests.fixtures.prometheus import (DASHBOARD, PrometheusServer, dashboard_queries,  # noqa: F401 - fixtures
                                       prometheus_binaries, promql_metric_names, start_exporter)
from tests.fixtures.s3 import free_port, storage_settings_for
from tests.fixtures.workers import REDIS_URL, Stack, wait_for

pytestmark = pytest.mark.slow

SHARD_SIZE = 4
NUM_SHARDS = 6
FAILED_SHARDS = (1, 4)
PROMPTS = [f"a handwritten {d % 10}" for d in range(SHARD_SIZE * NUM_SHARDS)]
SCRAPE_INTERVAL = "250ms"
"""Short enough to see a job of a few seconds pass through the backlog several times."""
TRITON_GPU_ONLY = ("nv_gpu_utilization",)
"""Triton metrics the dashboard uses that a CPU-only server does not export (checked in Triton's library instead)."""


class ShardClock(threading.Thread):
    """Polls the job's ``done`` and ``failed`` hashes; for each shard, the last time it was not yet in either."""

    def __init__(self, r: redis.Redis, keys: Keys, job_id: str) -> None:
        super().__init__(daemon=True)
        self.r, self.done_key, self.failed_key = r, keys.job(job_id, "done"), keys.job(job_id, "failed")
        self.not_yet: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.time()
            finished = {int(k) for k in self.r.hkeys(self.done_key)} | {int(k) for k in self.r.hkeys(self.failed_key)}
            for shard in range(NUM_SHARDS):
                if shard in finished:
                    self.seen.setdefault(shard, time.time())
                else:
                    self.not_yet[shard] = t
            self._halt.wait(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


@dataclass
class Observed:
    """Everything the tests below read: the Prometheus server, the job's outcome and the shard clock."""

    prom: PrometheusServer
    queue: str
    manifest: pa.Table
    failed_shards: dict[str, str]
    clock: ShardClock
    started_s: float
    busy_s: float
    """2 s after the last shard finished: every rate window of a few seconds or more still covers the job."""
    ended_s: float
    targets: dict[str, list[str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def observed(triton_server, moto_s3_endpoint: str, prometheus_binaries: dict[str, str],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("prom-it")
    tag = uuid.uuid4().hex[:10]
    bucket = f"genimg-test-{tag}"
    admin = S3Store(storage_settings_for(moto_s3_endpoint), bucket)
    admin.ensure_bucket()
    env = {
        "GENIMG_REDIS_URL": REDIS_URL, "GENIMG_QUEUE": f"genimg-test-{tag}", "GENIMG_KEY_PREFIX": f"genimg-test-{tag}",
        "GENIMG_TRITON_URL": triton_server.urls["grpc"], "GENIMG_S3_ENDPOINT_URL": moto_s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "GENIMG_BUCKET": bucket, "GENIMG_VISIBILITY_TIMEOUT_S": "60", "GENIMG_TASK_HARD_TIME_LIMIT_S": "45",
        "GENIMG_TASK_SOFT_TIME_LIMIT_S": "40", "GENIMG_RETRY_BACKOFF_MAX_S": "5", "GENIMG_RETRY_BACKOFF_BASE_S": "0.5",
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }
    with contextlib.ExitStack() as cleanup:  # every step undone, even when one of them fails
        cleanup.callback(_drop_bucket, admin)
        saved = {k: os.environ.get(k) for k in env}
        cleanup.callback(_restore_env, saved)
        os.environ.update(env)
        st = Stack(env, tmp)
        cleanup.callback(_drop_keys, st.redis, env)
        exporter = start_exporter(tmp, "--queue", env["GENIMG_QUEUE"], "--redis-url", REDIS_URL)
        cleanup.callback(exporter.stop)
        reconciler = start_exporter(tmp, command="reconcile",
                                    env={"GENIMG_RECONCILE_INTERVAL_S": "0.5", "GENIMG_RECONCILE_LEASE_S": "10"})
        cleanup.callback(reconciler.stop)
        cleanup.callback(st.stop_all)
        with Client() as client:
            job = client.submit(PROMPTS, images_per_prompt=1, output=f"s3://{bucket}/prom", seed=5,
                                shard_size=SHARD_SIZE, sub_batch_size=4, prompt_chunk_size=SHARD_SIZE)
            store, layout = client.job_store(job.spec)
            for shard in FAILED_SHARDS:  # the injected failures: these shards' prompts are gone
                store.delete_prefix(f"{layout.job_prefix}/{prompt_chunk_key(shard)}")
            worker_ports = [free_port(), free_port()]
            prom = PrometheusServer(prometheus_binaries["prometheus"], tmp, {
                "genimg-worker": [f"127.0.0.1:{port}" for port in worker_ports],
                "genimg-exporter": [exporter.target],
                "genimg-reconciler": [reconciler.target],
                "triton": [triton_server.urls["metrics"].removeprefix("http://").removesuffix("/metrics")],
            }, scrape_interval=SCRAPE_INTERVAL)
            cleanup.callback(prom.stop)
            prom.start()
            started = time.time()
            total = f'genimg_backlog_shards{{kind="total",queue="{env["GENIMG_QUEUE"]}"}}'
            wait_for(lambda: prom.value(total) == NUM_SHARDS, 60, "Prometheus to scrape the full backlog")
            clock = ShardClock(st.redis, Keys(env["GENIMG_KEY_PREFIX"]), job.job_id)
            clock.start()
            cleanup.callback(clock.stop)
            workers = [st.start_worker(GENIMG_CONCURRENCY=1, GENIMG_METRICS_PORT=port) for port in worker_ports]
            for w in workers:
                w.wait_ready()
            status = job.wait(progress=False, timeout_s=240)
            assert status.state == "failed" and status.shards_failed == len(FAILED_SHARDS), status
            manifest = job.manifest()
            failed = {k.decode(): v.decode() for k, v in
                      st.redis.hgetall(Keys(env["GENIMG_KEY_PREFIX"]).job(job.job_id, "failed")).items()}
        wait_for(lambda: exporter.backlog()[(env["GENIMG_QUEUE"], "total")] == 0, 60, "the backlog to drain")
        ended = time.time()
        wait_for(lambda: (prom.value("min(timestamp(up))") or 0) > ended + 1, 30,
                 "a scrape of every target after the job")
        clock.stop()
        yield Observed(prom=prom, queue=env["GENIMG_QUEUE"], manifest=manifest, failed_shards=failed, clock=clock,
                       started_s=started, busy_s=max(clock.seen.values()) + 2, ended_s=ended,
                       targets=prom.targets_up())


def _drop_bucket(admin: S3Store) -> None:
    admin.delete_prefix("", everything=True)
    admin.client.delete_bucket(Bucket=admin.bucket)
    admin.close()


def _restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _drop_keys(r: redis.Redis, env: dict[str, str]) -> None:
    for pattern in (f"{env['GENIMG_KEY_PREFIX']}:*", f"*{env['GENIMG_QUEUE']}*"):
        for key in r.scan_iter(pattern, count=1000):
            r.delete(key)


def test_prometheus_scrapes_both_workers_the_exporter_and_triton(observed: Observed):
    assert observed.targets == {"genimg-worker": ["up", "up"], "genimg-exporter": ["up"],
                                "genimg-reconciler": ["up"], "triton": ["up"]}


def test_the_reconciler_leads_sees_the_job_unfinished_while_it_runs_and_heals_nothing(observed: Observed):
    prom, queue = observed.prom, observed.queue
    assert prom.value("genimg_reconciler_leader") == 1
    assert prom.value(f'max_over_time(genimg_jobs_unfinished{{queue="{queue}"}}[10m])', observed.ended_s) == 1
    assert prom.value(f'genimg_jobs_unfinished{{queue="{queue}"}}') == 0  # finished (failed shards included)
    assert prom.value(f'genimg_reconciler_shards_requeued_total{{queue="{queue}"}}') in (None, 0)


def test_images_written_according_to_prometheus_equal_the_manifest_rows(observed: Observed):
    ok = [r for r in observed.manifest.to_pylist() if r["status"] == "ok"]
    assert len(ok) == (NUM_SHARDS - len(FAILED_SHARDS)) * SHARD_SIZE
    assert observed.prom.value("sum(genimg_images_written_total)") == len(ok)
    assert observed.prom.value('sum(genimg_images_written_total{model="txt2img",format="png"})') == len(ok)
    assert observed.prom.value("sum(genimg_bytes_written_total)") == sum(r["tar_size"] for r in ok)
    assert observed.prom.value("sum(genimg_shards_committed_total)") == NUM_SHARDS - len(FAILED_SHARDS)
    assert observed.prom.value('sum(genimg_stage_seconds_count{stage="shard"})') == NUM_SHARDS - len(FAILED_SHARDS)
    assert observed.prom.value("sum(genimg_shards_in_flight)") == 0


def test_failures_according_to_prometheus_equal_the_injected_failures(observed: Observed):
    assert sorted(int(s) for s in observed.failed_shards) == list(FAILED_SHARDS)
    by_reason = {r["metric"]["reason"]: float(r["value"][1])
                 for r in observed.prom.query("sum by (reason) (genimg_shards_failed_total) > 0")}
    assert by_reason == {"StorageNotFoundError": len(FAILED_SHARDS)}
    failed_items = [r for r in observed.manifest.to_pylist() if r["status"] != "ok"]
    assert (observed.prom.value("sum(genimg_items_failed_total)") or 0) == len(failed_items) == 0
    assert observed.prom.value("sum(genimg_shards_retried_total)") == 0  # a missing input is not retried


def test_the_backlog_returned_to_zero_only_after_the_last_shard_committed_or_failed(observed: Observed):
    window = int(time.time() - observed.started_s) + 5
    total = observed.prom.samples(f'genimg_backlog_shards{{kind="total",queue="{observed.queue}"}}', window)
    reserved = observed.prom.samples(f'genimg_backlog_shards{{kind="reserved",queue="{observed.queue}"}}', window)
    last_finish = max(observed.clock.not_yet.values())  # the last shard was still unfinished at this time
    assert sorted(observed.clock.seen) == list(range(NUM_SHARDS))

    before = [(t, v) for t, v in total if t <= last_finish]
    after = [(t, v) for t, v in total if t > last_finish]
    assert len(before) >= 3, total
    assert all(v > 0 for _, v in before), f"backlog read 0 before the last shard finished at {last_finish}: {before}"
    assert before[0][1] == NUM_SHARDS
    assert after and after[-1][1] == 0, after
    assert max(v for _, v in reserved) >= 1  # running shards are counted (acks late)


def test_every_rule_evaluates_without_error_on_the_real_metrics(observed: Observed):
    groups = observed.prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 19
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_recording_rules_give_throughput_stage_time_and_triton_batching_during_the_job(observed: Observed):
    at = observed.busy_s
    prom = observed.prom
    assert prom.value('genimg:images_written:rate1m{model="txt2img"}', at) > 0
    stages = {r["metric"]["stage"]: float(r["value"][1])
              for r in prom.query("genimg:stage_seconds_per_image:rate5m", at)}
    assert set(stages) == {"infer", "encode", "upload", "shard", "expand"}  # every stage exported from the start
    assert stages["expand"] == 0 and stages["infer"] > 0  # this job has no prompt expansion
    assert prom.value('model:nv_inference_batch_size:avg_rate5m{model="txt2img"}', at) >= 1
    assert prom.value('model:nv_inference_queue_seconds_per_request:rate5m{model="txt2img"}', at) >= 0
    assert prom.value('model:nv_inference_compute_seconds_per_request:rate5m{model="txt2img"}', at) > 0
    # rate() extrapolates each short series on its own, so on a job of seconds the ratio is only roughly 2/6
    # (its exact value is checked by promtool in rules_test.yml); both kinds of shard are in it
    ratio = wait_for(lambda: prom.value("genimg:shard_failure_ratio:rate10m"), 10, "the failure ratio to be recorded")
    assert 0 < ratio < 1
    assert prom.value(f'genimg:backlog_shards:total{{queue="{observed.queue}"}}') == 0
    firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


def _genimg_sample_names() -> set[str]:
    """Sample names genimg's workers export once a metric has a value (labelled ones appear on first use)."""
    from genimg import metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = set()
    for m in (metrics.IMAGES_WRITTEN, metrics.BYTES_WRITTEN, metrics.ITEMS_FAILED, metrics.SHARDS_COMMITTED,
              metrics.SHARDS_RETRIED, metrics.SHARDS_FAILED, metrics.STAGE_SECONDS, metrics.SHARDS_IN_FLIGHT):
        for family in m.describe():
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def _triton_library_bytes() -> bytes:
    import pytriton

    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    return b"".join(p.read_bytes() for p in libs.glob("libtritonserver*.so*"))


def test_every_dashboard_query_refers_only_to_metrics_genimg_or_triton_export(observed: Observed):
    scraped = set(observed.prom.api("label/__name__/values"))
    assert {"nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success",
            "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"} <= scraped
    genimg_declared = _genimg_sample_names()
    triton_lib = _triton_library_bytes()
    gpu_only = {n for n in TRITON_GPU_ONLY if n.encode() in triton_lib}
    assert gpu_only == set(TRITON_GPU_ONLY), "Triton's library no longer has these metric names"
    unknown = {}
    for title, expr in dashboard_queries(json.loads(DASHBOARD.read_text())):
        missing = promql_metric_names(expr) - scraped - genimg_declared - gpu_only
        if missing:
            unknown[title] = missing
    assert unknown == {}


def test_every_dashboard_query_over_scraped_metrics_returns_data_from_the_real_stack(observed: Observed):
    scraped = set(observed.prom.api("label/__name__/values"))
    empty = []
    for title, expr in dashboard_queries(json.loads(DASHBOARD.read_text())):
        if not promql_metric_names(expr) <= scraped:
            continue  # e.g. GPU utilisation on a CPU Triton, item failures when none happened
        q = expr.replace("$__rate_interval", "30s").replace("$queue", ".*")
        if not observed.prom.query(q, observed.busy_s):
            empty.append((title, q))
    assert empty == []

