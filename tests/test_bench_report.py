"""The benchmark's arithmetic: the idle split of a CPU timeline and the per-round / quiet ratios."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._infra import idle_split  # noqa: E402
from benchmarks._report import add_ratios  # noqa: E402


def test_idle_split_charges_the_idle_cpus_before_and_after_the_stubs_work_to_fill_and_drain():
    # 2 CPUs, 0.5 s steps; stubs busy (1.5 CPUs) from t=1 to t=4; everything uses 0.5 CPU before and after
    tl, total, stubs = [], 0.0, 0.0
    for k in range(11):
        t = 100 + 0.5 * k
        tl.append((t, total, stubs))
        busy = 1.0 <= t - 100 < 4.0
        total += 0.5 * (1.9 if busy else 0.5)
        stubs += 0.5 * (1.5 if busy else 0.0)
    out = idle_split(tl, 100.0, 105.0, 2)
    assert out is not None
    assert out["drain_s"] == pytest.approx(1.0)
    assert out["idle_drain_cpu_s"] == pytest.approx(2 * 1.0 - 0.5 * 1.0)
    assert out["fill_s"] == pytest.approx(1.25)  # busy from 1.0: the estimate is mid-interval of the first busy step
    assert out["used_cpu_s"] == pytest.approx(0.5 * 1 + 1.9 * 3 + 0.5 * 1)
    idle = out["idle_fill_cpu_s"] + out["idle_middle_cpu_s"] + out["idle_drain_cpu_s"]
    assert idle == pytest.approx(2 * 5 - out["used_cpu_s"])
    assert idle_split([(100.0, 0.0, 0.0), (100.5, 0.1, 0.0), (101.0, 0.2, 0.0)], 100, 101, 2) is None  # no stubs


def _run(ips: float, others: float) -> dict:
    return {"images": 100, "seconds": 100 / ips, "images_per_s": ips, "host_busy_share_other": others}


def test_ratios_pair_runs_of_a_round_and_the_quiet_ratio_ignores_disturbed_rounds():
    systems = {"genimg_best": {"images_per_s": 700.0, "runs": [_run(700, 0.05), _run(690, 0.05), _run(400, 0.5)]},
               "upper_bound": {"images_per_s": 540.0, "runs": [_run(760, 0.04), _run(540, 0.3), _run(320, 0.6)]}}
    result = {"systems": systems, "previous": {"images_per_s": {"genimg_best": 350.0}}}
    add_ratios(result)
    assert result["ratios"]["genimg_best/upper_bound"] == pytest.approx(700 / 540, abs=1e-3)
    assert [x["ratio"] for x in result["ratios_by_round"]["genimg_best/upper_bound"]] == pytest.approx(
        [700 / 760, 690 / 540, 400 / 320], abs=1e-3)
    assert result["ratios_quiet"]["genimg_best/upper_bound"] == pytest.approx(700 / 760, abs=1e-3)  # round 1 only
    assert result["ratios"]["genimg_best/previous_genimg_best"] == 2.0
    assert result["targets"]["genimg_best/upper_bound"]["met"] is True
    assert result["targets"]["genimg_best/upper_bound"]["met_quiet"] is True  # 0.92 >= 0.9
    assert result["targets"]["faces_genimg/faces_upper_bound"]["met_quiet"] is None
