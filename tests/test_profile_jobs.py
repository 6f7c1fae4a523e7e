"""Model profiles end to end: bad parameters refused before anything is stored, a terrain job, and a
user's own model added by a profile file and a repository entry alone (real Redis, Triton, S3, workers)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from genimg.errors import ValidationError
from genimg.imaging import decode
from genimg.layout import Layout
from genimg.stores.base import sha256_hex
from tests.fixtures.producer import ProducerEnv

# --------------------------------------------------------------------------- bad parameters

BAD_PARAMS = [
    ("unknown_parameter", {"model": "terrain", "count": 5, "params": {"steps": 4}}, "params.steps"),
    ("nan", {"model": "terrain", "count": 5, "params": {"difficulty": float("nan")}}, "params.difficulty"),
    ("inf", {"model": "terrain", "count": 5, "params": {"difficulty": float("inf")}}, "params.difficulty"),
    ("bool_for_int", {"model": "terrain", "count": 5, "params": {"difficulty": True}}, "params.difficulty"),
    ("float_for_int", {"model": "terrain", "count": 5, "params": {"difficulty": 50.5}}, "params.difficulty"),
    ("string_for_int", {"model": "terrain", "count": 5, "params": {"difficulty": "50"}}, "params.difficulty"),
    ("below_min", {"model": "terrain", "count": 5, "params": {"difficulty": 0}}, "params.difficulty"),
    ("above_max", {"model": "terrain", "count": 5, "params": {"difficulty": 101}}, "params.difficulty"),
    ("huge_list", {"model": "terrain", "count": 5, "params": {"difficulty": [50] * 100_000}}, "params.difficulty"),
    ("empty_list", {"model": "terrain", "count": 5, "params": {"difficulty": []}}, "params.difficulty"),
    ("list_with_a_bad_value", {"model": "terrain", "count": 5, "params": {"difficulty": [1, 50, 1000]}},
     "params.difficulty"),
    ("nested_mapping", {"model": "terrain", "count": 5, "params": {"difficulty": {"v": 1}}}, "params.difficulty"),
    ("params_not_a_mapping", {"model": "terrain", "count": 5, "params": [("difficulty", 5)]}, "params"),
    ("param_on_a_profile_without_params", {"model": "noise2img", "count": 5, "params": {"difficulty": 5}},
     "params.difficulty"),
    ("unknown_profile", {"model": "stable-diffusion-xl", "count": 5}, "model"),
    ("negative_prompt_unsupported", {"model": "terrain", "count": 5, "negative_prompt": "blurry"}, "negative_prompt"),
    ("prompts_for_a_noise_profile", {"model": "terrain", "prompts": ["mountains"]}, "prompts"),
    ("no_variant_without_upscale", {"model": "terrain", "count": 5, "upscale": False}, "upscale"),
]


@pytest.mark.parametrize(("given", "field"), [c[1:] for c in BAD_PARAMS], ids=[c[0] for c in BAD_PARAMS])
def test_bad_parameters_are_refused_naming_the_field_with_nothing_stored(shared_producer_env: ProducerEnv,
                                                                         given, field):
    env = shared_producer_env
    with pytest.raises(ValidationError) as info:
        env.client.submit(output=env.output, **given)
    assert info.value.field == field, str(info.value)
    assert len(str(info.value)) < 600
    assert env.stored_keys() == [] and env.messages() == [] and env.redis_keys() == []


def test_a_malformed_profile_file_is_named_with_its_path_and_nothing_is_stored(
        shared_producer_env: ProducerEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env = shared_producer_env
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "terrain.toml").write_text('name = "terrain"\ntask = "noise"\n[inputs\n')
    monkeypatch.setenv("GENIMG_PROFILES_DIR", str(d))
    with pytest.raises(ValidationError) as info:
        env.client.submit(model="terrain", count=5, output=env.output)
    assert info.value.field == "model" and str(d / "terrain.toml") in str(info.value)
    assert env.stored_keys() == [] and env.messages() == [] and env.redis_keys() == []


def test_cli_params_out_of_bounds_exit_2_naming_the_parameter(shared_producer_env: ProducerEnv):
    from typer.testing import CliRunner

    from producer.cli import app

    env = shared_producer_env
    for value, words in (("NaN", "an int, got nan"), ("1,50,101", "[1, 100]"), ("high", "an int")):
        res = CliRunner().invoke(app, ["submit", "--model", "terrain", "--count", "5", "--output", env.output,
                                       "--param", f"difficulty={value}"], env=env.env())
        assert res.exit_code == 2, (res.stdout, res.stderr)
        assert "invalid params.difficulty:" in res.stderr and words in res.stderr, res.stderr
    assert env.stored_keys() == [] and env.messages() == []


# --------------------------------------------------------------------------- terrain


def _tar_members(store, layout: Layout, shard: int) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(layout.tar_key(shard)))) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


@pytest.mark.slow
def test_terrain_job_across_difficulties_records_each_items_difficulty_and_reruns_byte_identically(
        stack, s3_bucket, triton_server):
    from genimg.pipeline import Infer, run_shard
    from genimg.triton.client import InferenceClient
    from producer import Client

    worker = stack.start_worker(GENIMG_CONCURRENCY=1)
    worker.wait_ready()
    with Client() as client:
        # 60 items (20 per difficulty) in 2 shards: the UNet costs ~0.1 s of CPU per image, and CI's hosts
        # run it up to 10x slower than that (200 items outlived a 400 s wait there)
        job = client.submit(model="terrain", count=60, params={"difficulty": [1, 50, 100]},
                            output=f"s3://{s3_bucket}/terrain", seed=3, shard_size=30, sub_batch_size=16)
        status = job.wait(progress=False, timeout_s=600)
        assert status.state == "succeeded", status
        table = job.manifest()
        store, layout = client.job_store(job.spec)
    rows = table.to_pylist()
    assert [r["item_index"] for r in rows] == list(range(60)) and all(r["status"] == "ok" for r in rows)
    members = {**_tar_members(store, layout, 0), **_tar_members(store, layout, 1)}
    means: dict[int, list[float]] = {1: [], 50: [], 100: []}
    for r in rows:
        want = [1, 50, 100][r["item_index"] % 3]
        meta = json.loads(members[f"{r['key']}.json"])
        assert meta["params"] == {"difficulty": want} and json.loads(r["params"]) == {"difficulty": want}
        assert (meta["profile"], meta["model"], r["profile"]) == ("terrain", "terrain", "terrain")
        image = decode(members[f"{r['key']}.png"])
        assert image.shape == (128, 128, 1) and sha256_hex(members[f"{r['key']}.png"]) == r["sha256"]
        means[want].append(float(image.mean()))
    assert rows[0]["model_version"] == meta["model_version"] and len(rows[0]["model_version"]) == 16
    m1, m50, m100 = (float(np.mean(means[d])) for d in (1, 50, 100))
    spread = max(float(np.std(means[d])) for d in (1, 50, 100))
    print(f"terrain mean grey level: difficulty 1 {m1:.1f}, 50 {m50:.1f}, 100 {m100:.1f}; largest sd {spread:.1f}")
    # the model makes harder terrain higher (brighter): 68.2 / 96.5 / 127.9 for this seed (per-image sd <= 26.2)
    assert m1 + 15 < m50 < m100 - 15
    with InferenceClient(triton_server.urls["grpc"], "grpc") as triton:
        again = Layout(bucket=layout.bucket, prefix="terrain-again", job_id=layout.job_id)
        run_shard(job.spec, 1, store=store, layout=again, infer=Infer(triton))
    assert store.get_bytes(again.tar_key(1)) == store.get_bytes(layout.tar_key(1))
    from genimg.shards import read_shard_index

    timings = ["infer_s", "encode_s", "tar_key"]  # each run's timings, and the other prefix; the rest is identical
    assert read_shard_index(store, again, 1).drop_columns(timings).equals(
        read_shard_index(store, layout, 1).drop_columns(timings))


# --------------------------------------------------------------------------- a user's own model

OWN_PROFILE = """
name = "{name}"
task = "noise"
triton_model = "tiny_rgb"
description = "a colour swatch with a ramp, made by the test"
licence = "CC0-1.0"

[inputs.latent]
kind = "noise"
dtype = "FP32"
shape = [3]
distribution = "uniform"

[inputs.gain]
kind = "param"
dtype = "FP32"
shape = [1]

[params.gain]
type = "float"
min = 0.1
max = 10
default = 1.0

[image]
tensor = "rgb"
dtype = "FP32"
range = [0, 1]
layout = "CHW"
channels = {channels}
height = 16
width = 24

[metadata.brightness]
tensor = "mean"
type = "float"
dtype = "FP32"

[[serve.models]]
name = "tiny_rgb"
onnx = "tiny_rgb.onnx"
"""

RAMP = (np.arange(16 * 24, dtype=np.float32).reshape(1, 1, 16, 24) / np.float32(16 * 24 - 1)) * np.float32(0.1)


def _write_tiny_onnx(path: Path) -> None:
    """``rgb = 0.9 * sigmoid(latent * gain)`` per channel + a ramp, ``mean`` over the image; rank-1 ``gain``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Unsqueeze", ["gain", "axis1"], ["g2"]),
        helper.make_node("Mul", ["latent", "g2"], ["x"]),
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Reshape", ["s", "shape4"], ["s4"]),
        helper.make_node("Mul", ["s4", "c09"], ["a"]),
        helper.make_node("Add", ["a", "ramp"], ["rgb"]),
        helper.make_node("ReduceMean", ["rgb"], ["mean"], axes=[1, 2, 3], keepdims=0),
    ]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([-1, 3, 1, 1], np.int64), "shape4"),
             numpy_helper.from_array(np.array(0.9, np.float32), "c09"),
             numpy_helper.from_array(RAMP, "ramp")]
    graph = helper.make_graph(
        nodes, "tiny_rgb",
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("gain", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("rgb", TensorProto.FLOAT, ["batch", 3, 16, 24]),
         helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.slow
def test_a_new_model_runs_end_to_end_from_a_profile_file_and_a_repository_entry_alone(
        stack, s3_bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from producer.cli import models_app
    from genimg.triton.server import TritonServer
    from producer import Client

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    _write_tiny_onnx(profiles / "tiny_rgb.onnx")
    (profiles / "swatch.toml").write_text(OWN_PROFILE.format(name="swatch", channels=3))
    (profiles / "swatch_grey.toml").write_text(OWN_PROFILE.format(name="swatch_grey", channels=1)
                                               .replace("[[serve.models]]\nname = \"tiny_rgb\"\n"
                                                        "onnx = \"tiny_rgb.onnx\"\n", ""))
    repo = tmp_path / "repo"
    res = CliRunner().invoke(models_app, ["build-repo", "--profiles-dir", str(profiles), "--profiles-only",
                                          "--out", str(repo)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in repo.iterdir()) == ["genimg_repository.json", "tiny_rgb"]
    server = TritonServer(repo, exit_timeout_s=5)
    server.start()
    try:
        server.wait_ready(timeout_s=120)
        monkeypatch.setenv("GENIMG_PROFILES_DIR", str(profiles))
        worker = stack.start_worker(GENIMG_CONCURRENCY=1, GENIMG_PROFILES_DIR=str(profiles),
                                    GENIMG_TRITON_URL=server.urls["grpc"], GENIMG_TRITON_EXPANDER="")
        worker.wait_ready()
        with Client() as client:
            job = client.submit(model="swatch", count=40, params={"gain": [0.5, 2.0]}, output=f"s3://{s3_bucket}/own",
                                seed=5, shard_size=20, sub_batch_size=8)
            bad = client.submit(model="swatch_grey", count=4, output=f"s3://{s3_bucket}/own-grey", seed=5)
            assert job.wait(progress=False, timeout_s=180).state == "succeeded"
            bad_status = bad.wait(progress=False, timeout_s=180)
            table = job.manifest()
            store, layout = client.job_store(job.spec)
    finally:
        server.stop()
    assert bad_status.state == "failed" and bad_status.shards_failed == 1
    reason = bad_status.summary["failed_shards"]["0"]
    assert reason.startswith("profile_mismatch: tiny_rgb: output rgb is served as FP32 [3, 16, 24]"), reason
    rows = table.to_pylist()
    assert [r["item_index"] for r in rows] == list(range(40)) and table.column_names[-1] == "brightness"
    members = {**_tar_members(store, layout, 0), **_tar_members(store, layout, 1)}
    onnx_sha = sha256_hex((profiles / "tiny_rgb.onnx").read_bytes())
    for r in rows:
        gain = [0.5, 2.0][r["item_index"] % 2]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(r["seed"]))))
        latent = rng.random(3, dtype=np.float32) * np.float32(2) - np.float32(1)
        sig = np.float32(1) / (np.float32(1) + np.exp(-(latent * np.float32(gain))))
        want = (sig.reshape(3, 1, 1) * np.float32(0.9) + RAMP[0]).transpose(1, 2, 0)
        got = decode(members[f"{r['key']}.png"])
        assert got.shape == (16, 24, 3)
        assert np.abs(got.astype(int) - np.rint(want * 255).astype(int)).max() <= 1
        assert r["brightness"] == pytest.approx(float(want.mean()), abs=1e-5)
        meta = json.loads(members[f"{r['key']}.json"])
        assert meta["params"] == {"gain": gain} and meta["brightness"] == r["brightness"]
        assert r["model_version"] == onnx_sha[:16] and r["profile"] == "swatch" and r["format"] == "png"


# --------------------------------------------------------------------------- faces x4 (pretrained, RGB)


def test_a_faces_x4_shard_is_256px_rgb_and_byte_identical_when_recomputed_or_rebatched(
        triton_server, s3_store, s3_bucket):
    from genimg.pipeline import Infer, run_shard
    from genimg.spec import JobSpec
    from genimg.triton.client import InferenceClient

    spec = JobSpec.create(model="faces_x4", count=30, output=f"s3://{s3_bucket}/faces", seed=42, shard_size=12,
                          sub_batch_size=5)
    tars = []
    with InferenceClient(triton_server.urls["grpc"], "grpc") as triton:
        for run, sub in enumerate((5, 5, 12)):
            layout = Layout(bucket=s3_bucket, prefix=f"faces-{run}", job_id=spec.job_id)
            result = run_shard(spec.model_copy(update={"sub_batch_size": sub}), 1, store=s3_store, layout=layout,
                               infer=Infer(triton))
            assert (result.items_ok, result.items_failed) == (12, 0)
            tars.append(s3_store.get_bytes(layout.tar_key(1)))
    assert tars[0] == tars[1] == tars[2]
    with tarfile.open(fileobj=io.BytesIO(tars[0])) as tf:
        pngs = [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".png")]
    images = np.stack([decode(p) for p in pngs])
    assert images.shape == (12, 256, 256, 3)
    # faces, not noise: neighbouring pixels agree (an upscaled 64 px face is smooth), and images differ
    assert np.abs(np.diff(images.astype(int), axis=2)).mean() < 12
    assert len({sha256_hex(p) for p in pngs}) == 12
