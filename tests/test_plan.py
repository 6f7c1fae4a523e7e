"""``genimg plan``'s arithmetic: the deploy settings it reads, shards on pods, CPU sharing, autoscaling."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from genimg.plan import Keda, Load, Profile, keda_from_deploy, plan_job, requests_per_shard, simulate
from producer.cli import app

FAST = Profile(images_per_s=100.0, cpu_s_per_image=0.01)


def test_the_built_in_autoscaling_defaults_are_what_deploy_says():
    read = keda_from_deploy()
    assert "deploy/k8s" in read.source
    assert replace(read, source="") == replace(Keda(), source="")


def test_one_worker_runs_the_shards_back_to_back_and_cpu_sharing_caps_two():
    keda = Keda(max_pods=1, concurrency=1, node_start_s=0.0)
    end, first, pods, _ = simulate([Load("j", 1000, 100, FAST)], keda, autoscale=False)
    assert (end, first, pods) == (pytest.approx(10.0), 0.0, 1)
    two = replace(keda, max_pods=2)
    assert simulate([Load("j", 1000, 100, FAST)], two, autoscale=False)[0] == pytest.approx(5.0)
    # each worker wants one CPU; with one CPU between them, two workers are no faster than one
    assert simulate([Load("j", 1000, 100, FAST)], two, cpus=1.0, autoscale=False)[0] == pytest.approx(10.0)
    # a short last shard and a second job queued behind the first
    end = simulate([Load("a", 250, 100, FAST), Load("b", 100, 100, replace(FAST, images_per_s=50.0))], keda,
                   autoscale=False)[0]
    assert end == pytest.approx(2.5 + 2.0)


def test_autoscaling_starts_one_pod_then_grows_each_period_and_the_fast_path_agrees_with_the_slow_one():
    keda = Keda(max_pods=8, concurrency=2, node_start_s=100.0, polling_s=10.0)
    load = Load("j", 2_000_000, 1000, Profile(images_per_s=400.0))
    end, first, pods, requested = simulate([load], keda)
    assert pods == 8 and first == pytest.approx(105.0)  # KEDA's first poll (5 s) + node start
    assert requested[:5] == [5.0] + [65.0] * 4  # 1 pod, then +4 after a period, then +100 %
    halves = [replace(load, items=1_000_000), replace(load, name="k", items=1_000_000)]
    assert simulate(halves, keda)[0] == pytest.approx(end, rel=1e-3)  # two loads: no fast-forward
    p = plan_job(load, keda, finalise_s=3.0)
    assert p.wall_s == pytest.approx(p.submit_s + end + 3.0)
    assert p.gpu_hours_busy == pytest.approx(2_000_000 / 400 / 3600)
    assert p.gpu_hours_billed > p.gpu_hours_busy
    assert p.images_per_s_steady == 8 * 400
    assert p.s3_requests_per_s["PUT"] == pytest.approx(3.2 * (3 + 2 / 100))


def test_requests_per_shard_follow_the_protocol():
    text = Load("t", 1000, 1000, Profile(images_per_s=1.0, image_bytes=100_000.0, text=True), prompt_chunk_size=250)
    req = requests_per_shard(text, part_shards=100)
    assert req["HEAD"] == 1 and req["GET"] == pytest.approx(5 + 1 + 0.01)
    assert req["PUT"] == pytest.approx(2 + 7 + 2 + 0.02)  # ~102 MB tar: multipart of 7 parts, stats, index


def test_genimg_plan_prints_a_plan_and_refuses_an_unknown_profile():
    res = CliRunner().invoke(app, ["plan", "--model", "txt2img", "--count", "1000000", "--images-per-s", "500",
                                   "--gpus-max", "4", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["pods_peak"] == 4 and doc["shards"] == 1000 and doc["wall_s"] > 1_000_000 / 2000
    bad = CliRunner().invoke(app, ["plan", "--model", "nope", "--count", "10", "--images-per-s", "1"])
    assert bad.exit_code == 2
