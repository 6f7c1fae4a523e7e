"""Model profiles without servers: reading, validating parameters, building tensors, reading outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genimg.errors import ValidationError
from genimg.profiles import load_profiles, read_profile
from genimg.profiles.params import MAX_SWEEP_VALUES, item_params, parse_cli_param, resolve_params
from genimg.profiles.tensors import ProfileMismatchError, build_inputs, check_served, read_images, read_metadata
from genimg.seeds import item_seeds, noise_from_seed

BUNDLED = ("faces", "faces_x4", "faces_x4_vintage", "noise2img", "noise2img_base", "terrain", "txt2img",
           "txt2img_base")

TINY = """
name = "tiny"
task = "noise"
triton_model = "tiny_rgb"
description = "a test model"
licence = "MIT"

[inputs.latent]
kind = "noise"
dtype = "FP32"
shape = [3]
distribution = "uniform"
scale = 2.0

[inputs.gain]
kind = "param"
dtype = "FP32"
shape = [1]

[params.gain]
type = "float"
min = 0.1
max = 10
default = 1.0

[params.size]
type = "int"
min = 8
max = 64
default = 16
shape_changing = true

[inputs.size]
kind = "param"
dtype = "INT32"
shape = [1]

[image]
tensor = "rgb"
dtype = "FP32"
range = [0, 1]
layout = "CHW"
channels = 3

[metadata.mean]
tensor = "mean"
type = "float"
dtype = "FP32"
"""


def _write(d: Path, name: str, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.toml"
    p.write_text(text)
    return p


@pytest.fixture
def tiny(tmp_path: Path):
    return read_profile(_write(tmp_path, "tiny", TINY))


def test_bundled_profiles_load_and_each_names_its_file_task_and_licence():
    found = load_profiles()
    assert sorted(found.profiles) == list(BUNDLED) and found.errors == {}
    for name, p in found.profiles.items():
        assert p.name == name and p.licence and p.description
    assert found.profiles["txt2img"].without_upscale == "txt2img_base"
    assert found.profiles["terrain"].params["difficulty"].min == 1
    assert found.resolve("noise2img", upscale=False).name == "noise2img_base"
    with pytest.raises(ValidationError) as info:
        found.resolve("terrain", upscale=False)
    assert info.value.field == "upscale"


def test_a_malformed_profile_is_reported_with_its_path_and_does_not_hide_the_valid_ones(tmp_path: Path):
    d = tmp_path / "profiles"
    _write(d, "tiny", TINY)
    bad = {
        "broken_toml": "name = [unclosed",
        "unknown_key": TINY.replace('name = "tiny"', 'name = "unknown_key"\ncolour = "red"'),
        "wrong_name": TINY,
        "unbound_param": TINY.replace('name = "tiny"', 'name = "unbound_param"') + '\n[params.extra]\ntype = "int"\n'
                                                                                   'default = 1\n',
        "default_out_of_bounds": TINY.replace('name = "tiny"', 'name = "default_out_of_bounds"')
                                     .replace("default = 1.0", "default = 100.0"),
        "reserved_column": TINY.replace('name = "tiny"', 'name = "reserved_column"')
                               .replace("[metadata.mean]", "[metadata.seed]"),
    }
    for name, text in bad.items():
        _write(d, name, text)
    found = load_profiles(d)
    assert list(found.profiles) == ["tiny"]
    assert sorted(Path(p).stem for p in found.errors) == sorted(bad)
    for path, why in found.errors.items():
        assert path.startswith(str(d)) and path in why
    assert "colour" in found.errors[str(d / "unknown_key.toml")]
    assert "differs from the file name" in found.errors[str(d / "wrong_name.toml")]
    with pytest.raises(ValidationError) as info:
        found.get("unknown_key")
    assert info.value.field == "model" and "failed to load" in str(info.value)


def test_parameters_take_defaults_and_sweeps_cycle_over_item_indices(tiny):
    params = resolve_params(tiny, {"gain": [0.5, 2], "size": 32})
    assert params == {"gain": [0.5, 2.0], "size": 32}
    assert [item_params(params, i)["gain"] for i in range(5)] == [0.5, 2.0, 0.5, 2.0, 0.5]
    assert resolve_params(tiny, None) == {"gain": 1.0, "size": 16}


@pytest.mark.parametrize(("given", "field", "words"), [
    ({"colour": 1}, "params.colour", "not a parameter"),
    ({"gain": float("nan")}, "params.gain", "finite"),
    ({"gain": float("inf")}, "params.gain", "finite"),
    ({"gain": "2.0"}, "params.gain", "number"),
    ({"gain": True}, "params.gain", "number"),
    ({"size": True}, "params.size", "an int"),
    ({"size": 16.0}, "params.size", "an int"),
    ({"size": 7}, "params.size", "[8, 64]"),
    ({"gain": 10.5}, "params.gain", "[0.1, 10]"),
    ({"gain": []}, "params.gain", "sweep"),
    ({"gain": [1.0] * (MAX_SWEEP_VALUES + 1)}, "params.gain", "sweep"),
    ({"gain": [1.0, None]}, "params.gain", "value 1"),
    ({"size": 2**60}, "params.size", "2**53"),
    ({"gain": {"a": 1}}, "params.gain", "number"),
])
def test_bad_parameters_are_refused_naming_the_field(tiny, given, field, words):
    with pytest.raises(ValidationError) as info:
        resolve_params(tiny, given)
    assert info.value.field == field and words in str(info.value)


def test_cli_params_are_typed_by_the_profile(tiny):
    assert parse_cli_param("gain=2", tiny) == ("gain", 2)
    assert parse_cli_param("gain=0.5,2", tiny) == ("gain", [0.5, 2])
    assert parse_cli_param("size=NaN", tiny)[1] != parse_cli_param("size=NaN", tiny)[1]  # NaN: refused later
    with pytest.raises(ValidationError) as info:
        parse_cli_param("gain", tiny)
    assert info.value.field == "param"


def test_digit_noise_binding_is_bit_identical_to_the_seed_definition():
    profile = load_profiles().get("noise2img")
    seeds = item_seeds(7, range(40, 44))
    inputs = build_inputs(profile, seeds=seeds, prompts=[None] * 4, item_values=[{}] * 4, negative_prompt=None)
    assert list(inputs) == ["Z"] and inputs["Z"].dtype == np.float32 and inputs["Z"].shape == (4, 100)
    for k, s in enumerate(seeds.tolist()):
        np.testing.assert_array_equal(inputs["Z"][k], noise_from_seed(s))


def test_terrain_inputs_scale_noise_by_sigma_and_map_difficulty_to_unit_range():
    profile = load_profiles().get("terrain")
    seeds = item_seeds(1, [0, 1, 2])
    values = [{"difficulty": d} for d in (1, 50, 100)]
    inputs = build_inputs(profile, seeds=seeds, prompts=[None] * 3, item_values=values, negative_prompt=None)
    assert inputs["noisy"].shape == (3, 1, 128, 128)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seeds[0]))))
    np.testing.assert_array_equal(inputs["noisy"][0].reshape(-1),
                                  rng.standard_normal(128 * 128, dtype=np.float32) * np.float32(80))
    np.testing.assert_array_equal(inputs["sigma"], np.full((3, 1), 80, np.float32))
    np.testing.assert_allclose(inputs["difficulty"].reshape(-1), [0, 49 / 99, 1], atol=1e-7)


def test_float_chw_images_convert_saturating_to_uint8_hwc_and_non_finite_items_are_flagged(tiny):
    img = np.zeros((3, 3, 2, 2), np.float32)
    img[0, 0] = 1.02  # red channel of item 0 saturates to 255
    img[1, 1] = -0.5  # green of item 1 clips to 0
    img[2, 2, 0, 0] = np.nan
    out = {"rgb": img, "mean": np.array([[0.25], [np.nan], [0.5]], np.float32)}
    images, finite = read_images(tiny, out)
    assert images.shape == (3, 2, 2, 3) and images.dtype == np.uint8
    assert images[0, :, :, 0].tolist() == [[255, 255], [255, 255]] and images[1].max() == 0
    assert finite.tolist() == [True, True, False]
    assert read_metadata(tiny, out, 0) == {"mean": 0.25}
    assert read_metadata(tiny, out, 1) == {"mean": None}


def test_a_served_model_that_differs_from_its_profile_is_named_by_tensor(tiny):
    good_in = {"latent": ("FP32", (3,)), "gain": ("FP32", (1,)), "size": ("INT32", (1,))}
    good_out = {"rgb": ("FP32", (3, -1, -1)), "mean": ("FP32", (1,))}
    check_served(tiny, good_in, good_out)
    with pytest.raises(ProfileMismatchError, match="input latent is served as FP16"):
        check_served(tiny, {**good_in, "latent": ("FP16", (3,))}, good_out)
    with pytest.raises(ProfileMismatchError, match="output rgb is served as FP32 \\[1, -1, -1\\]"):
        check_served(tiny, good_in, {**good_out, "rgb": ("FP32", (1, -1, -1))})
    with pytest.raises(ProfileMismatchError, match="output mean is in the profile but not served"):
        check_served(tiny, good_in, {"rgb": good_out["rgb"]})
    assert ProfileMismatchError.reason == "profile_mismatch"


def test_models_list_prints_every_profile_with_parameters_as_json(tmp_path: Path):
    from typer.testing import CliRunner

    from genimg.models.cli import app

    res = CliRunner().invoke(app, ["list", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = {r["name"]: r for r in doc["profiles"]}
    assert sorted(rows) == list(BUNDLED) and doc["errors"] == {}
    assert rows["terrain"]["params"]["difficulty"] == {
        "type": "int", "min": 1, "max": 100, "default": 50,
        "description": "terrain difficulty, 1 (gentle) .. 100 (rugged)"}
    assert rows["terrain"]["image"] == "128x128x1" and rows["terrain"]["licence"] == "MIT"
    assert rows["txt2img"]["task"] == "text" and rows["txt2img"]["image"] == "112x112x1"
    d = tmp_path / "p"
    _write(d, "tiny", TINY)
    _write(d, "bad", "name = 'bad'")
    res = CliRunner().invoke(app, ["list", "--json", "--profiles-dir", str(d)])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert [r["name"] for r in doc["profiles"]] == ["tiny"] and list(doc["errors"]) == [str(d / "bad.toml")]
