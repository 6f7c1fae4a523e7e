"""Load the committed weights and export every model to ONNX with a dynamic batch axis.

Files written by :func:`export_all` (the serving contract, see docs/models.md):

- ``text_encoder.onnx``: ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [B, T]
  → ``EMBEDDING`` float32 [B, 384]
- ``generator.onnx``: ``Z`` float32 [B, 100], ``COND`` float32 [B, 384]
  → ``IMAGE`` uint8 [B, 28, 28, 1], ``FINITE`` bool [B, 1]
- ``generator_uncond.onnx``: ``Z`` float32 [B, 100] → ``IMAGE`` uint8 [B, 28, 28, 1], ``FINITE`` bool [B, 1]
- ``upscaler.onnx``: ``IMAGE`` uint8 [B, H, W, C] → ``UPSCALED`` uint8 [B, 4H, 4W, C]
- ``verifier.onnx``: ``IMAGE`` uint8 [B, 28, 28, 1] → ``LABEL`` int32 [B, 1], ``SCORE`` float32 [B, 1]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, overload

import torch
from safetensors.torch import load_file

from genimg.errors import ModelError
from genimg.models.nets import (
    COND_DIM,
    Z_DIM,
    Generator,
    GeneratorForExport,
    UncondGeneratorForExport,
    Upscaler,
    UpscalerForExport,
    Verifier,
    VerifierForExport,
)
from genimg.settings import WEIGHTS_DIR

OPSET = 17
ONNX_NAMES = ("text_encoder", "generator", "generator_uncond", "upscaler", "verifier")


@overload
def load_trained(name: Literal["generator"], weights_dir: Path = ...) -> Generator: ...
@overload
def load_trained(name: Literal["upscaler"], weights_dir: Path = ...) -> Upscaler: ...
@overload
def load_trained(name: Literal["verifier"], weights_dir: Path = ...) -> Verifier: ...
@overload
def load_trained(name: str, weights_dir: Path = ...) -> torch.nn.Module: ...


def load_trained(name: str, weights_dir: Path = WEIGHTS_DIR) -> torch.nn.Module:
    """Build ``name`` (generator, upscaler, verifier) and load its committed weights, in eval mode.

    Raises:
        ModelError: the weights file is missing or does not fit the network.
    """
    cls = {"generator": Generator, "upscaler": Upscaler, "verifier": Verifier}[name]
    path = Path(weights_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise ModelError(f"no trained weights at {path}; run `genimg models train {name}`")
    module = cls()
    try:
        module.load_state_dict(load_file(str(path)))
    except (RuntimeError, KeyError) as e:
        raise ModelError(f"weights at {path} do not fit {cls.__name__}: {e}") from e
    return module.eval()


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return path


def export_generator(out_dir: Path, weights_dir: Path = WEIGHTS_DIR) -> list[Path]:
    """Write ``generator.onnx`` and ``generator_uncond.onnx``."""
    gen = load_trained("generator", weights_dir)
    z, c = torch.randn(2, Z_DIM), torch.randn(2, COND_DIM)
    batch = {0: "batch"}
    return [
        _export(GeneratorForExport(gen), (z, c), out_dir / "generator.onnx", ["Z", "COND"], ["IMAGE", "FINITE"],
                {"Z": batch, "COND": batch, "IMAGE": batch, "FINITE": batch}),
        _export(UncondGeneratorForExport(gen), (z,), out_dir / "generator_uncond.onnx", ["Z"], ["IMAGE", "FINITE"],
                {"Z": batch, "IMAGE": batch, "FINITE": batch}),
    ]


def export_upscaler(out_dir: Path, weights_dir: Path = WEIGHTS_DIR) -> list[Path]:
    """Write ``upscaler.onnx`` (batch, height, width and channels dynamic)."""
    up = UpscalerForExport(load_trained("upscaler", weights_dir))
    img = torch.randint(0, 256, (2, 28, 28, 1), dtype=torch.uint8)
    return [_export(up, (img,), out_dir / "upscaler.onnx", ["IMAGE"], ["UPSCALED"],
                    {"IMAGE": {0: "batch", 1: "height", 2: "width", 3: "channels"},
                     "UPSCALED": {0: "batch", 1: "height4", 2: "width4", 3: "channels"}})]


def export_verifier(out_dir: Path, weights_dir: Path = WEIGHTS_DIR) -> list[Path]:
    """Write ``verifier.onnx``."""
    ver = VerifierForExport(load_trained("verifier", weights_dir))
    img = torch.randint(0, 256, (2, 28, 28, 1), dtype=torch.uint8)
    batch = {0: "batch"}
    return [_export(ver, (img,), out_dir / "verifier.onnx", ["IMAGE"], ["LABEL", "SCORE"],
                    {"IMAGE": batch, "LABEL": batch, "SCORE": batch})]


def export_all(out_dir: str | os.PathLike[str], weights_dir: Path = WEIGHTS_DIR,
               with_text_encoder: bool = True) -> dict[str, Path]:
    """Export every model into ``out_dir``; returns ``{name: path}`` for :data:`ONNX_NAMES`."""
    from genimg.models import text_encoder

    out = Path(out_dir)
    paths = export_generator(out, weights_dir) + export_upscaler(out, weights_dir) + export_verifier(out, weights_dir)
    if with_text_encoder:
        paths.append(text_encoder.export_onnx(out / "text_encoder.onnx"))
    return {p.stem: p for p in paths}
