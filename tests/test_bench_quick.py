"""The benchmark's ``--quick`` mode runs end to end and writes every figure the full run reports (issue 9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ("upper_bound", "genimg_default", "genimg_best", "naive_celery")


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_quick_bench_reports_images_per_s_cpu_and_memory_for_every_system(quick_result):
    result, _ = quick_result
    assert result["settings"]["quick"] is True
    assert result["settings"]["format"] == "png" and result["settings"]["upscale"] is True
    n = result["settings"]["images"]
    for name in MEASURED:
        s = result["systems"][name]
        assert s["rounds"] == 1 and len(s["runs"]) == 1
        assert 0 < s["images_per_s"] < 5000, (name, s["images_per_s"])
        assert 0 < s["cpu_s_per_image"] < 1.0, (name, s["cpu_s_per_image"])
        run = s["runs"][0]
        assert run["images"] == n
        assert run["seconds"] > 0
        for stage in ("infer", "encode"):
            p = s["stage_seconds"][stage]
            assert p["n"] > 0 and 0 <= p["p50"] <= p["p95"], (name, stage, p)
        assert s["peak_rss_mib"], name
        assert all(v["process"] > 0 for v in s["peak_rss_mib"].values()), (name, s["peak_rss_mib"])
    assert result["systems"]["ray_data"]["images_per_s"] is None
    assert "skipped" in result["systems"]["ray_data"]
    assert "triton_stub" in result["systems"]["genimg_best"]["peak_rss_mib"]
    assert "genimg_worker" in result["systems"]["genimg_best"]["peak_rss_mib"]
    assert "naive_worker" in result["systems"]["naive_celery"]["peak_rss_mib"]


def test_quick_bench_reports_ratios_targets_triton_view_and_a_chart(quick_result):
    result, out = quick_result
    r = result["ratios"]
    assert set(r) >= {"genimg_best/upper_bound", "genimg_best/naive_celery", "genimg_best/ray_data"}
    assert r["genimg_best/upper_bound"] > 0 and r["genimg_best/naive_celery"] > 0
    assert r["genimg_best/ray_data"] is None  # Ray is not installed in quick mode
    assert set(result["targets"]) == {"genimg_best/upper_bound", "genimg_best/naive_celery", "genimg_best/ray_data"}
    levels = result["triton_view"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["images_per_s"] > 0 and not lv["errors"]
        assert lv["models"]["txt2img"]["requests"] > 0
        assert lv["models"]["upscaler"]["compute_us_per_request"] > 0
        assert lv["models"]["text_encoder"]["queue_us_per_request"] >= 0
    assert result["budget"]["cpus"] and result["machine"]["logical_cpus"] >= 1
    png = Path(result["chart"])
    assert png == out.with_suffix(".png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| genimg_best |" in out.with_suffix(".md").read_text()
