"""The benchmark's arithmetic: the idle split of a CPU timeline and the per-round / quiet ratios."""

from __future__ import annotations

import sys
import threading
import time
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
    assert result["targets"]["faces_genimg/faces_upper_bound"]["met"] is None  # not measured is not "missed"


def _probed(ips: float, cost_ms: float) -> dict:
    return {**_run(ips, 0.05), "speed": {"unit_cpu_ms": cost_ms, "samples": 50}}


def test_speed_correction_scales_a_run_on_a_slow_host_up_and_cancels_at_equal_speed():
    # the bound ran while a unit cost 12 ms (a slow host), genimg while it cost 8 ms
    systems = {"genimg_best": {"images_per_s": 150.0, "runs": [_probed(150, 8.0)] * 3},
               "upper_bound": {"images_per_s": 110.0, "runs": [_probed(110, 12.0)] * 3},
               "genimg_previous_default": {"images_per_s": 100.0, "runs": [_probed(100, 8.0)] * 3}}
    result = {"systems": systems}
    add_ratios(result)
    assert result["ratios"]["genimg_best/upper_bound"] == pytest.approx(150 / 110, abs=1e-3)
    assert result["ratios_speed_corrected"]["genimg_best/upper_bound"] == pytest.approx(
        150 * 8 / (110 * 12), abs=1e-3)  # 0.909: the bound's slow host is taken out
    assert result["ratios_speed_corrected"]["genimg_best/genimg_previous_default"] == pytest.approx(1.5, abs=1e-3)
    t = result["targets"]["genimg_best/upper_bound"]
    assert t["met"] is True and t["met_speed_corrected"] is True
    systems["upper_bound"]["runs"] = [_probed(110, 12.0), _probed(110, 12.0), _run(110, 0.05)]  # one unprobed run
    add_ratios(result)
    assert result["ratios_speed_corrected"]["genimg_best/upper_bound"] is None
    assert result["targets"]["genimg_best/upper_bound"]["met_speed_corrected"] is None


def test_speed_probe_summarises_the_clock_window_by_its_harmonic_mean_and_reports_a_failure():
    from benchmarks._speed import MIN_SAMPLES, SpeedProbe

    probe = SpeedProbe.__new__(SpeedProbe)  # no session: the arithmetic only
    probe.error = None
    probe.samples = [(100.0 + k, 8.0 if k % 2 else 16.0) for k in range(20)] + [(200.0, 1000.0)]
    s = probe.summary(100.0, 119.5)  # the 1000 ms unit at t=200 is outside the window
    assert s["samples"] == 20 and s["unit_cpu_ms"] == pytest.approx(2 / (1 / 8 + 1 / 16), abs=1e-3)
    assert s["unit_cpu_ms_p10"] == 8.0 and s["unit_cpu_ms_p90"] == 16.0
    assert probe.summary(100.0, 100.0 + MIN_SAMPLES - 2) == {"samples": MIN_SAMPLES - 1}  # too few: no cost
    assert probe.cpu_s() == pytest.approx((10 * 8 + 10 * 16 + 1000) / 1000)
    probe.error = "RuntimeError: boom"
    assert probe.summary() == {"error": "RuntimeError: boom"}


def test_speed_probe_records_an_exception_in_its_thread_instead_of_dying_silently():
    from benchmarks._speed import SpeedProbe

    probe = SpeedProbe.__new__(SpeedProbe)
    probe.interval_s, probe._thread = 0.01, None
    probe._stop = threading.Event()
    calls = []

    def unit_ms() -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("session gone")
        return 5.0

    probe.unit_ms = unit_ms
    with probe:
        deadline = time.monotonic() + 10
        while probe.error is None and time.monotonic() < deadline:  # poll with a deadline
            time.sleep(0.01)
    assert probe.error == "RuntimeError: session gone" and len(probe.samples) == 2
    assert probe.summary() == {"error": "RuntimeError: session gone"}
