"""Worker metrics under Celery prefork (case C4), scraped over HTTP from a real `genimg worker`.

Totals are checked against what storage holds: the manifest gives the true
number of images and of their bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from producer import Client
from tests.worker_support import listening_ports, results, scrape, total

STALE = {"images": 1000, "shards": 77, "in_flight": 5}
"""What the dead process's leftover files claim."""


def _leave_stale_metrics(directory: Path) -> list[str]:
    """Metrics files written by prometheus_client in a process that has exited since (an earlier run)."""
    directory.mkdir(parents=True)
    code = ("from genimg import metrics\n"
            f"metrics.IMAGES_WRITTEN.labels('noise2img_base', 'png').inc({STALE['images']})\n"
            f"metrics.SHARDS_COMMITTED.inc({STALE['shards']})\n"
            f"metrics.SHARDS_IN_FLIGHT.inc({STALE['in_flight']})\n")
    dead = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
                          capture_output=True, text=True, timeout=60)
    assert dead.returncode == 0, dead.stderr
    names = sorted(p.name for p in directory.iterdir())
    assert any(n.startswith("counter_") for n in names) and any(n.startswith("gauge_livesum_") for n in names)
    return names


class _ChildWatcher(threading.Thread):
    """Records every pool child pid of a worker (polling /proc every 20 ms)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/task/{pid}/children")
        self.seen: set[int] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.seen |= {int(p) for p in self.path.read_text().split()}
            except OSError:
                return
            self.halt.wait(0.02)


@pytest.mark.slow
def test_recycled_prefork_children_and_a_stale_file_still_give_exact_totals_on_one_endpoint(stack, s3_bucket):
    # Concurrency 2, not the case's 4: this machine has 2 cores, and a child recycled after every shard
    # spends ~1 s building its Triton and S3 clients; 4 children only doubled the run time.
    metrics_dir = stack.tmp / "metrics0"  # the directory start_worker gives the first worker
    stale = _leave_stale_metrics(metrics_dir)
    worker = stack.start_worker(GENIMG_CONCURRENCY=2, GENIMG_MAX_TASKS_PER_CHILD=1)
    worker.wait_ready()
    assert not set(stale) & {p.name for p in metrics_dir.iterdir()}  # cleaned at start
    before = scrape(worker.metrics_port)
    assert total(before, "genimg_images_written_total") == 0
    assert total(before, "genimg_shards_committed_total") == 0
    assert total(before, "genimg_shards_in_flight") == 0
    watcher = _ChildWatcher(worker.proc.pid)
    watcher.start()
    try:
        with Client() as client:
            job = client.submit(count=80, model="noise2img", output=f"s3://{s3_bucket}/c4", seed=4, shard_size=2,
                                upscale=False)
            status = job.wait(progress=False, timeout_s=150, poll_s=0.2)
            manifest = job.manifest()
    finally:
        watcher.halt.set()
        watcher.join()
    assert status.state == "succeeded" and status.shards_done == 40, status
    samples = scrape(worker.metrics_port)
    assert total(samples, "genimg_images_written_total") == manifest.num_rows == 80
    assert total(samples, "genimg_bytes_written_total") == sum(manifest.column("tar_size").to_pylist())
    assert total(samples, "genimg_shards_committed_total") == 40
    assert total(samples, "genimg_stage_seconds_count", stage="shard") == 40
    assert total(samples, "genimg_shards_in_flight") == 0
    assert total(samples, "genimg_items_failed_total") == 0
    assert len(watcher.seen) >= 20, watcher.seen  # children really were recycled (one per shard)
    # One endpoint for the whole pod: the only listening socket of the main process and its children.
    assert listening_ports([worker.proc.pid, *worker.children()]) == {worker.metrics_port}


@pytest.mark.slow
def test_a_shard_committed_by_a_run_that_died_before_counting_is_counted_by_its_redelivery(
        stack, s3_bucket, triton_server):
    from genimg.pipeline import Infer, run_shard
    from genimg.triton.client import InferenceClient

    with Client() as client:
        job = client.submit(count=6, model="noise2img", output=f"s3://{s3_bucket}/late", seed=8, shard_size=3,
                            upscale=False)
        store, layout = client.job_store(job.spec)
        # A worker that committed shard 0 and was killed before it marked it done (and counted it).
        with InferenceClient(triton_server.urls["grpc"], "grpc") as triton:
            run_shard(job.spec, 0, store=store, layout=layout, infer=Infer(triton))
        worker = stack.start_worker()
        worker.wait_ready()
        status = job.wait(progress=False, timeout_s=60, poll_s=0.2)
        manifest = job.manifest()
    assert status.state == "succeeded", status
    assert sorted(r["status"] for _, _, r in results(worker.log())) == ["already_committed", "committed"]
    samples = scrape(worker.metrics_port)
    assert total(samples, "genimg_images_written_total") == 6
    assert total(samples, "genimg_bytes_written_total") == sum(manifest.column("tar_size").to_pylist())
    assert total(samples, "genimg_shards_committed_total") == 2
