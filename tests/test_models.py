"""The committed models: quality figures, export contract, TensorRT profile logic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from genimg.models import engines
from genimg.models.evaluate import evaluate
from genimg.models.nets import UpscalerForExport, Upscaler, to_uint8
from genimg.settings import WEIGHTS_DIR

RECORDED = json.loads((WEIGHTS_DIR / "eval.json").read_text())


@pytest.fixture(scope="module")
def figures(onnx_dir):
    return evaluate(WEIGHTS_DIR, onnx_dir)


@pytest.mark.slow
def test_committed_weights_meet_the_quality_bar(figures):
    assert figures["verifier_heldout_acc"] >= 0.97
    assert figures["text_cond_acc"] >= 0.85
    assert figures["uncond_min_class_frac"] >= 0.04
    assert figures["sr_psnr_db"] - figures["bicubic_psnr_db"] >= 0.8
    assert figures["onnx_max_abs_diff"] <= 1e-4
    assert figures["onnx_max_abs_diff_uint8"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("key,tol", [
    ("verifier_heldout_acc", 0.002), ("text_cond_acc", 0.01), ("uncond_min_class_frac", 0.01),
    ("sr_psnr_db", 0.05), ("bicubic_psnr_db", 0.01),
])
def test_committed_weights_reproduce_the_recorded_eval(figures, key, tol):
    assert figures[key] == pytest.approx(RECORDED[key], abs=tol)


def test_uint8_conversion_saturates_and_rounds_never_wraps():
    x = torch.tensor([1.02, -1.05, 1.0, -1.0, 0.0, 0.999])
    assert to_uint8(x, -1.0, 1.0).tolist() == [255, 0, 255, 0, 128, 255]


@pytest.mark.parametrize("channels", [1, 3])
def test_upscaler_serving_form_keeps_channels_and_multiplies_size_by_4(channels):
    up = UpscalerForExport(Upscaler().eval())
    img = torch.randint(0, 256, (2, 9, 7, channels), dtype=torch.uint8)
    with torch.no_grad():
        out = up(img)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (2, 36, 28, channels)


def test_committed_weights_are_small_and_pickle_free():
    files = list(WEIGHTS_DIR.glob("*.safetensors"))
    assert {f.stem for f in files} == {"generator", "upscaler", "verifier"}
    assert sum(f.stat().st_size for f in files) <= 20_000_000
    for f in files:
        assert all(t.dtype == torch.float32 or t.dtype == torch.int64 for t in load_file(str(f)).values())


def test_training_is_deterministic_for_a_seed(tmp_path):
    from genimg.models.train import train_verifier

    a = load_file(str(train_verifier(tmp_path / "a", seed=3, epochs=1)))
    b = load_file(str(train_verifier(tmp_path / "b", seed=3, epochs=1)))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorrt_profiles_cover_batch_1_64_256_for_every_engine_input():
    for model, inputs in engines.ENGINE_MODELS.items():
        profiles = engines.profiles_for(model)
        assert [p.name for p in profiles] == list(inputs)
        for p in profiles:
            assert (p.min[0], p.opt[0], p.max[0]) == (1, 64, 256)
            assert (p.min[1:], p.opt[1:], p.max[1:]) == inputs[p.name]
    assert engines.profiles_for("generator")[0].min == (1, 100)
    assert [(p.name, p.max) for p in engines.profiles_for("terrain")] == [
        ("noisy", (256, 1, 128, 128)), ("sigma", (256,)), ("difficulty", (256,))]  # rank-1 inputs: [B]


def test_tensorrt_profile_rejects_unordered_batch_sizes_and_shapes():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        engines.profiles_for("generator", (64, 1, 256))
    with pytest.raises(ValueError, match="x.IMAGE: shapes must satisfy"):
        engines.profiles_for("x", inputs={"IMAGE": ((64, 64, 3), (16, 16, 3), (128, 128, 3))})


def test_every_bundled_profile_model_has_an_engine_profile_that_covers_what_its_pipeline_sends():
    from genimg.profiles import load_profiles

    profiles = load_profiles().profiles
    served = {m.name for p in profiles.values() if p.serve for m in p.serve.models}
    assert served == {"faces", "esrgan_slim_x4", "vintage", "terrain"}
    assert served <= set(engines.ENGINE_MODELS)
    faces_hw = (profiles["faces"].image.height, profiles["faces"].image.width, profiles["faces"].image.channels)
    big_hw = (profiles["faces_x4"].image.height, profiles["faces_x4"].image.width, 3)
    for model, item in (("esrgan_slim_x4", faces_hw), ("vintage", big_hw)):  # faces 64 -> ESRGAN -> 256 -> vintage
        (p,) = engines.profiles_for(model)
        assert all(lo <= d <= hi for d, lo, hi in zip(item, p.min[1:], p.max[1:])), (model, item, p)
        assert p.opt[1:] == item  # tuned for the size the pipeline sends
    assert engines.profiles_for("esrgan_slim_x4")[0].max[1:] == (128, 128, 3)


def test_engine_shapes_come_from_the_onnx_signature_when_fixed(triton_onnx_dir):
    assert engines.onnx_item_shapes(triton_onnx_dir / "generator.onnx") == {
        "Z": ((100,),) * 3, "COND": ((384,),) * 3}
    why = engines.onnx_item_shapes(triton_onnx_dir / "upscaler.onnx")
    assert isinstance(why, str) and "IMAGE" in why and "variable axis" in why


def test_build_engines_without_tensorrt_exits_0_with_one_reason_line():
    from genimg.models.cli import app

    if engines.tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present: engines would really be built")
    result = CliRunner().invoke(app, ["build-engines"])
    assert result.exit_code == 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("build-engines: skipped:")


def test_onnx_exports_have_a_dynamic_batch_axis(onnx_dir):
    import onnxruntime as ort

    for name in ("generator", "generator_uncond", "upscaler", "verifier", "text_encoder"):
        sess = ort.InferenceSession(str(onnx_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for t in list(sess.get_inputs()) + list(sess.get_outputs()):
            assert isinstance(t.shape[0], str), f"{name}.{t.name} batch axis is fixed: {t.shape}"
    sess = ort.InferenceSession(str(onnx_dir / "generator.onnx"), providers=["CPUExecutionProvider"])
    img = sess.run(None, {"Z": np.zeros((3, 100), np.float32), "COND": np.zeros((3, 384), np.float32)})[0]
    assert img.dtype == np.uint8 and img.shape == (3, 28, 28, 1)
