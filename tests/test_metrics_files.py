"""The worker's multiprocess metric files: real child processes write them, the /metrics code reads and folds them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from genimg.metrics import multiprocess_registry
from genimg.metrics_server import scrape_body

_CHILD = """
from genimg import metrics
metrics.SHARDS_COMMITTED.inc()
metrics.IMAGES_WRITTEN.labels("noise2img", "png").inc(3)
metrics.ITEMS_FAILED.labels("non_finite_output").inc(1)
metrics.STAGE_SECONDS.labels("shard").observe(0.2)
metrics.STAGE_SECONDS.labels("infer").observe(30.0)
metrics.SHARDS_IN_FLIGHT.inc()
"""


def _run_children(directory: Path, n: int) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env=env) for _ in range(n)]
    assert [p.wait(60) for p in procs] == [0] * n


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_counts_of_dead_processes_fold_into_one_archive_per_type_and_every_total_stays_exact(tmp_path: Path):
    _run_children(tmp_path, 6)
    assert len(list(tmp_path.glob("counter_*.db"))) == 6
    unfolded = _samples(generate_latest(multiprocess_registry(tmp_path)))

    folded = _samples(scrape_body(tmp_path))

    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["counter_archive.db", "histogram_archive.db"]
    assert folded == {k: v for k, v in unfolded.items() if k[0] != "genimg_shards_in_flight"}
    assert folded[("genimg_images_written_total", (("format", "png"), ("model", "noise2img")))] == 18
    assert folded[("genimg_stage_seconds_bucket", (("le", "0.25"), ("stage", "shard")))] == 6
    assert folded[("genimg_stage_seconds_bucket", (("le", "25.0"), ("stage", "infer")))] == 0
    assert folded[("genimg_stage_seconds_count", (("stage", "infer"),))] == 6


def test_a_second_fold_adds_new_dead_processes_to_the_archive_without_counting_anything_twice(tmp_path: Path):
    _run_children(tmp_path, 3)
    scrape_body(tmp_path)
    _run_children(tmp_path, 2)

    first = _samples(scrape_body(tmp_path))
    again = _samples(scrape_body(tmp_path))

    assert first == again
    assert first[("genimg_shards_committed_total", ())] == 5
    assert first[("genimg_items_failed_total", (("reason", "non_finite_output"),))] == 5
    assert first[("genimg_stage_seconds_sum", (("stage", "shard"),))] == 5 * 0.2
    assert first.get(("genimg_shards_in_flight", ()), 0) == 0


def test_files_of_a_live_process_are_left_alone_and_its_in_flight_gauge_counts_until_it_exits(tmp_path: Path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    live = subprocess.Popen([sys.executable, "-c", _CHILD + "print('ready', flush=True); import sys; sys.stdin.read()"],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "ready"
        during = _samples(scrape_body(tmp_path))
        assert sorted(p.name for p in tmp_path.glob("*.db")) == sorted(
            [f"counter_{live.pid}.db", f"histogram_{live.pid}.db", f"gauge_livesum_{live.pid}.db"])
        assert during[("genimg_shards_in_flight", ())] == 1
    finally:
        live.stdin.close()
        assert live.wait(30) == 0
    after = _samples(scrape_body(tmp_path))
    assert after.get(("genimg_shards_in_flight", ()), 0) == 0
    assert after[("genimg_shards_committed_total", ())] == 1
