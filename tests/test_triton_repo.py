"""The model repository builder: configs parse with tritonclient's model_config_pb2 and follow the contract."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from genimg.errors import ConfigError, ModelError, ValidationError
from genimg import contract
from genimg.triton.repo import (
    MANIFEST,
    build_repository,
    preferred_batch_sizes,
    read_config,
    served_models,
    tensorrt_profiles,
)

DIGIT_ENSEMBLES = ("txt2img", "noise2img", "txt2img_base", "noise2img_base")
"""The digit pipelines, declared by the bundled profiles' [serve] sections."""
TYPES = {"FP32": "TYPE_FP32", "UINT8": "TYPE_UINT8", "INT32": "TYPE_INT32", "BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL"}


@pytest.fixture(scope="module")
def trt_repo(tmp_path_factory: pytest.TempPathFactory, triton_onnx_dir: Path) -> Path:
    plans = tmp_path_factory.mktemp("plans")
    (plans / "generator.plan").write_bytes(b"not really an engine")
    return build_repository(tmp_path_factory.mktemp("trt") / "repo", "tensorrt", triton_onnx_dir, instances=2,
                            plan_dir=plans)


TYPES_ALL = {**TYPES, "FP16": "TYPE_FP16", "INT64": "TYPE_INT64", "UINT64": "TYPE_UINT64"}


def _configs(repo: Path) -> dict:
    return {name: read_config(repo / name / "config.pbtxt") for name in served_models(repo)}


def _dtype_name(pb_value: int) -> str:
    from tritonclient.grpc import model_config_pb2 as pb

    return pb.DataType.Name(pb_value)


@pytest.mark.parametrize("flavor", ["cpu", "tensorrt"])
def test_every_model_and_ensemble_declares_the_contract_tensors(flavor, triton_repo, trt_repo):
    repo = triton_repo if flavor == "cpu" else trt_repo
    configs = _configs(repo)
    assert set(contract.ALL) <= set(configs)
    for name, spec in contract.ALL.items():
        cfg = configs[name]
        assert cfg.name == name
        for declared, wanted in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
            got = [(t.name, _dtype_name(t.data_type), tuple(t.dims)) for t in declared]
            assert got == [(t.name, TYPES[t.dtype], t.dims) for t in wanted], name


@pytest.mark.parametrize("flavor", ["cpu", "tensorrt"])
def test_every_model_batches_at_least_64_with_dynamic_batching_and_warmup(flavor, triton_repo, trt_repo):
    configs = _configs(triton_repo if flavor == "cpu" else trt_repo)
    for name in contract.ALL:
        assert configs[name].max_batch_size >= contract.MIN_MAX_BATCH_SIZE, name
    for name in contract.MODELS:
        cfg = configs[name]
        batching = cfg.dynamic_batching
        assert list(batching.preferred_batch_size) == preferred_batch_sizes(cfg.max_batch_size)
        assert max(batching.preferred_batch_size) == cfg.max_batch_size
        assert 0 < batching.max_queue_delay_microseconds <= 10_000, name
        assert {w.batch_size for w in cfg.model_warmup} == {1, 64}, name
        for warmup in cfg.model_warmup:
            assert set(warmup.inputs) == {t.name for t in cfg.input}, name
            assert all(-1 not in i.dims for i in warmup.inputs.values()), name


def test_ensembles_have_no_instances_batcher_or_warmup_as_triton_requires(triton_repo):
    for name in DIGIT_ENSEMBLES:
        cfg = read_config(triton_repo / name / "config.pbtxt")
        assert cfg.platform == "ensemble"
        assert not cfg.instance_group and not cfg.model_warmup and not cfg.HasField("dynamic_batching")
        assert (triton_repo / name / "1").is_dir()


def test_every_profile_model_declares_the_tensors_its_profile_binds(triton_repo):
    from genimg.profiles import load_profiles

    for profile in load_profiles().profiles.values():
        cfg = read_config(triton_repo / profile.triton_model / "config.pbtxt")
        got_in = {t.name: (_dtype_name(t.data_type), tuple(t.dims)) for t in cfg.input}
        assert got_in == {n: (TYPES_ALL[b.dtype], tuple(b.shape)) for n, b in profile.inputs.items()}, profile.name
        got_out = {t.name: (_dtype_name(t.data_type), tuple(t.dims)) for t in cfg.output}
        assert got_out[profile.image.tensor] == (TYPES_ALL[profile.image.dtype], profile.image.dims)
        for m in profile.metadata.values():
            assert got_out[m.tensor] == (TYPES_ALL[m.dtype], tuple(m.shape))
        assert len(cfg.parameters["genimg_sha256"].string_value) == 64, profile.name


def test_ensembles_verify_the_28px_generator_output_and_return_the_upscaled_image(triton_repo):
    for name in DIGIT_ENSEMBLES:
        steps = {s.model_name: s for s in read_config(triton_repo / name / "config.pbtxt").ensemble_scheduling.step}
        gen = steps["generator" if name.startswith("txt2img") else "generator_uncond"]
        small = gen.output_map["IMAGE"]
        assert gen.output_map["FINITE"] == "FINITE"
        assert steps["verifier"].input_map["IMAGE"] == small
        if name.endswith("_base"):
            assert small == "IMAGE" and "upscaler" not in steps
        else:
            assert steps["upscaler"].input_map["IMAGE"] == small
            assert steps["upscaler"].output_map["UPSCALED"] == "IMAGE"
    txt = {s.model_name: s for s in read_config(triton_repo / "txt2img" / "config.pbtxt").ensemble_scheduling.step}
    assert txt["generator"].input_map["COND"] == "COND" and "text_encoder" not in txt  # per prompt, before it


def test_cpu_flavour_runs_python_backend_onnx_models_on_cpu_instances(triton_repo):
    from tritonclient.grpc import model_config_pb2 as pb

    for name in contract.MODELS:
        cfg = read_config(triton_repo / name / "config.pbtxt")
        assert cfg.backend == "python"
        assert [(g.kind, g.count) for g in cfg.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 1)]
        assert cfg.parameters["intra_op_threads"].string_value == "1"
        assert cfg.parameters["providers"].string_value == "CPUExecutionProvider"
        files = {p.name for p in (triton_repo / name / "1").iterdir()}
        assert {"model.py", "genimg_ort.py", "model.onnx"} <= files
    assert (triton_repo / "text_encoder" / "1" / "tokenizer.json").is_file()
    assert read_config(triton_repo / "text_encoder" / "config.pbtxt").parameters["max_tokens"].string_value == "256"


def test_instance_count_option_sets_every_instance_group(tmp_path, triton_onnx_dir):
    from tritonclient.grpc import model_config_pb2 as pb

    repo = build_repository(tmp_path / "r", "cpu", triton_onnx_dir, instances=3, intra_op_threads=2)
    for name in contract.MODELS:
        cfg = read_config(repo / name / "config.pbtxt")
        assert [(g.kind, g.count) for g in cfg.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 3)]
        assert cfg.parameters["intra_op_threads"].string_value == "2"


def test_tensorrt_flavour_points_engines_at_model_plan_on_gpu_instances(trt_repo):
    from tritonclient.grpc import model_config_pb2 as pb

    for name in contract.MODELS:
        cfg = read_config(trt_repo / name / "config.pbtxt")
        assert [(g.kind, g.count) for g in cfg.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, 2)]
        if name == "text_encoder":
            assert cfg.backend == "python" and not cfg.platform
            assert cfg.parameters["providers"].string_value.startswith("CUDAExecutionProvider")
            assert (trt_repo / name / "1" / "model.onnx").is_file()
        else:
            assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
            assert not (trt_repo / name / "1" / "model.onnx").exists()


def test_tensorrt_batch_limits_fit_the_engines_optimisation_profiles(trt_repo):
    profiles = tensorrt_profiles()
    for name, inputs in profiles.items():
        cfg = read_config(trt_repo / name / "config.pbtxt")
        assert set(inputs) == {t.name for t in cfg.input}, name
        for t in cfg.input:
            p = inputs[t.name]
            assert p["min"][0] == 1 and p["opt"][0] == 64 and p["max"][0] >= cfg.max_batch_size
            assert all(p["min"][0] <= b <= p["max"][0] for b in cfg.dynamic_batching.preferred_batch_size)
            for d, lo, hi in zip(t.dims, p["min"][1:], p["max"][1:]):  # config dims admit the profile's shapes
                assert d == -1 or d == lo == hi, (name, t.name)
            for warm in cfg.model_warmup:  # warmup requests must be inside the profile
                assert p["min"][0] <= warm.batch_size <= p["max"][0]
                dims = list(warm.inputs[t.name].dims)
                assert all(lo <= d <= hi for d, lo, hi in zip(dims, p["min"][1:], p["max"][1:])), (name, dims)


def test_tensorrt_rank1_inputs_are_reshaped_to_the_engines_batch_only_shape(trt_repo, triton_repo):
    trt = read_config(trt_repo / "terrain" / "config.pbtxt")
    cpu = read_config(triton_repo / "terrain" / "config.pbtxt")
    flat = {t.name: (list(t.dims), t.HasField("reshape"), list(t.reshape.shape)) for t in trt.input}
    assert flat == {"noisy": ([1, 128, 128], False, []), "sigma": ([1], True, []), "difficulty": ([1], True, [])}
    assert not any(t.HasField("reshape") for t in cpu.input)  # the Python backend flattens [B, 1] itself


def test_tensorrt_plans_are_copied_and_missing_ones_listed(trt_repo):
    manifest = json.loads((trt_repo / MANIFEST).read_text())
    assert (trt_repo / "generator" / "1" / "model.plan").read_bytes() == b"not really an engine"
    assert manifest["plans_missing"] == ["esrgan_slim_x4", "faces", "generator_uncond", "terrain", "upscaler",
                                         "verifier", "vintage"]
    assert manifest["tensorrt_profiles"] == tensorrt_profiles()


def test_tensorrt_max_batch_size_above_the_profile_is_rejected(tmp_path, triton_onnx_dir):
    with pytest.raises(ValidationError, match="max_batch_size"):
        build_repository(tmp_path / "r", "tensorrt", triton_onnx_dir, max_batch_size=512)


def test_text_encoder_warmup_sample_is_one_length_prefixed_utf8_prompt(triton_repo):
    raw = (triton_repo / "text_encoder" / "warmup" / "prompt").read_bytes()
    (n,) = struct.unpack_from("<I", raw)
    assert len(raw) == 4 + n and raw[4:].decode("utf-8")


@pytest.mark.parametrize("kwargs, field", [({"max_batch_size": 32}, "max_batch_size"), ({"instances": 0}, "instances"),
                                           ({"flavor": "onnxruntime"}, "flavor")])
def test_out_of_range_options_are_rejected(tmp_path, triton_onnx_dir, kwargs, field):
    with pytest.raises(ValidationError, match=field):
        build_repository(tmp_path / "r", onnx_dir=triton_onnx_dir, **kwargs)


def test_onnx_files_with_wrong_tensor_names_are_rejected(tmp_path, triton_onnx_dir):
    bad = tmp_path / "onnx"
    shutil.copytree(triton_onnx_dir, bad)
    shutil.copyfile(bad / "generator_uncond.onnx", bad / "verifier.onnx")
    with pytest.raises(ModelError, match="verifier"):
        build_repository(tmp_path / "r", "cpu", bad)


def test_a_foreign_non_empty_directory_is_not_replaced_but_an_earlier_build_is(tmp_path, triton_onnx_dir):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        build_repository(foreign, "tensorrt", triton_onnx_dir)
    assert (foreign / "notes.txt").read_text() == "keep me"
    repo = build_repository(tmp_path / "repo", "tensorrt", triton_onnx_dir)
    (repo / "stale").mkdir()
    build_repository(repo, "tensorrt", triton_onnx_dir)
    assert not (repo / "stale").exists()


def test_manifest_records_flavour_options_and_file_hashes(triton_repo):
    manifest = json.loads((triton_repo / MANIFEST).read_text())
    assert manifest["flavor"] == "cpu" and manifest["max_batch_size"] == 256
    fetched = {"terrain", "faces", "esrgan_slim_x4", "vintage", contract.EXPANDER.name}
    ensembles = {*DIGIT_ENSEMBLES, "faces_x4", "faces_x4_vintage"}
    assert set(manifest["sha256"]) == {*contract.MODELS, *fetched, *ensembles}
    assert manifest["ensembles"] == sorted(ensembles)
    assert manifest["profiles"] == sorted([*DIGIT_ENSEMBLES, "terrain", "faces", "faces_x4", "faces_x4_vintage"])
    assert manifest["extra_models"] == ["prompt_echo"]
