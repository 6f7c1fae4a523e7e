"""The benchmark's ``--quick`` mode runs end to end and writes every figure the full run reports (issues 9, 14, 20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ("upper_bound", "upper_bound_per_image", "genimg_default", "genimg_best", "genimg_per_image",
            "genimg_previous_default", "naive_celery", "faces_upper_bound", "faces_genimg")


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_quick_bench_reports_images_per_s_cpu_and_memory_for_every_system(quick_result):
    result, _ = quick_result
    assert result["settings"]["quick"] is True
    assert result["settings"]["format"] == "png" and result["settings"]["upscale"] is True
    for name in MEASURED:
        n = result["settings"]["faces_images" if name.startswith("faces") else "images"]
        n = result["settings"]["naive_images"] if name == "naive_celery" else n
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
        speed = run["speed"]  # the speed probe in the clock's window (a quick run may hold under 10 samples)
        assert (set(speed) == {"samples"} and speed["samples"] < 10) or (
            speed["samples"] >= 10 and speed["unit_cpu_ms"] > 0
            and 0 < speed["unit_cpu_ms_p10"] <= speed["unit_cpu_ms_median"] <= speed["unit_cpu_ms_p90"]), (name, speed)
    for ray in ("ray_data", "faces_ray_data"):
        assert result["systems"][ray]["images_per_s"] is None
        assert "skipped" in result["systems"][ray]
    assert "triton_stub" in result["systems"]["genimg_best"]["peak_rss_mib"]
    assert "genimg_worker" in result["systems"]["genimg_best"]["peak_rss_mib"]
    assert "naive_worker" in result["systems"]["naive_celery"]["peak_rss_mib"]


def test_quick_bench_embeds_each_prompt_once_except_in_the_per_image_variants(quick_result):
    result, _ = quick_result
    n, ipp = result["settings"]["images"], result["settings"]["images_per_prompt"]
    assert ipp == 4
    systems = result["systems"]
    # Triton's own counters: the text encoder ran on the distinct prompts only, the ensemble on every image
    best = systems["genimg_best"]["runs"][0]["triton_models"]
    assert best["text_encoder"]["items"] == n // ipp and best["txt2img"]["items"] == n
    per_image = systems["genimg_per_image"]["runs"][0]["triton_models"]
    assert per_image["text_encoder"]["items"] == n and per_image["txt2img_per_image"]["items"] == n
    previous = systems["genimg_previous_default"]["runs"][0]
    assert previous["triton_models"]["text_encoder"]["items"] == n and previous["config"]["sub_batch_size"] == 64
    assert systems["upper_bound"]["runs"][0]["prompts_embedded"] == n // ipp
    assert systems["upper_bound_per_image"]["runs"][0]["prompts_embedded"] == n
    faces = systems["faces_genimg"]["runs"][0]["triton_models"]
    assert faces["faces"]["items"] == faces["esrgan_slim_x4"]["items"] == result["settings"]["faces_images"]


def test_quick_bench_breaks_cpu_per_image_down_by_model_and_stage(quick_result):
    result, _ = quick_result
    want = {"txt2img": {"text_encoder", "generator", "upscaler", "verifier"},
            "faces_x4": {"faces", "esrgan_slim_x4"}, "noise2img": {"generator_uncond", "upscaler", "verifier"}}
    for pipeline, models in want.items():
        b = result["breakdown"][pipeline]
        assert set(b["models"]) == models, pipeline
        assert all(m["bound"] > 0 for m in b["models"].values()), (pipeline, b["models"])
        assert b["png_encode"] > 0 and b["used"]["genimg"] > 0 and b["used"]["bound"] > 0
        assert b["capacity"]["genimg"] > 0 and b["capacity"]["bound"] > 0
        assert set(b["idle"]) == {"fill", "middle", "drain"} and all(v >= 0 for v in b["idle"].values())
    rgb = result["breakdown"]["faces_x4"]["png_encode"]
    assert rgb > result["breakdown"]["txt2img"]["png_encode"]  # 256x256 RGB against 112x112 grey


def test_quick_bench_reports_ratios_targets_triton_view_and_a_chart(quick_result):
    result, out = quick_result
    r = result["ratios"]
    assert set(r) >= {"genimg_best/upper_bound", "genimg_best/naive_celery", "genimg_best/ray_data",
                      "genimg_best/genimg_per_image", "faces_genimg/faces_upper_bound", "faces_genimg/faces_ray_data"}
    assert r["genimg_best/upper_bound"] > 0 and r["genimg_best/naive_celery"] > 0
    assert r["faces_genimg/faces_upper_bound"] > 0 and r["genimg_best/genimg_per_image"] > 0
    assert r["genimg_best/genimg_previous_default"] > 0 and r["genimg_default/genimg_previous_default"] > 0
    assert set(result["ratios_speed_corrected"]) == set(result["ratios_by_round"])
    assert "speed-corrected" in out.with_suffix(".md").read_text()
    assert r["genimg_best/ray_data"] is None and r["faces_genimg/faces_ray_data"] is None  # no Ray in quick mode
    assert set(result["targets"]) == {"genimg_best/upper_bound", "genimg_best/ray_data_steady",
                                      "genimg_best/genimg_previous_default", "genimg_best/naive_celery",
                                      "faces_genimg/faces_upper_bound", "faces_genimg/faces_ray_data"}
    assert result["previous"]["images_per_s"]["genimg_best"] > 0  # the run before issue 20, for the ratio
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
