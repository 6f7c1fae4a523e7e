"""Quality figures of the trained models (``genimg models eval``).

Keys of :func:`evaluate`'s result:

* ``verifier_heldout_acc`` — verifier accuracy on the 500 held-out MNIST digits.
* ``text_cond_acc`` — share of generated images the verifier labels with the
  intended digit, over the 10 :data:`~genimg.models.data.EVAL_TEMPLATES` × 10
  digits × 20 seeds (2,000 images, phrasings never used in training).
* ``uncond_min_class_frac`` — smallest class share among 2,000 empty-prompt
  (all-zero condition) samples, as labelled by the verifier.
* ``sr_psnr_db`` / ``bicubic_psnr_db`` — mean PSNR (uint8, all channels) of
  the ×4 upscaler and of plain bicubic on the held-out skimage images.
* ``onnx_max_abs_diff`` — worst |ONNX Runtime − PyTorch| over the float
  outputs (EMBEDDING, SCORE); ``onnx_max_abs_diff_uint8`` the same over the
  uint8 image outputs; ``onnx_diffs`` per model and output.

All images go through the uint8 serving wrappers, as Triton would return them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genimg.models import data
from genimg.models.export import export_all, load_trained
from genimg.models.nets import (
    COND_DIM,
    Z_DIM,
    GeneratorForExport,
    UncondGeneratorForExport,
    UpscalerForExport,
    VerifierForExport,
)
from genimg.settings import WEIGHTS_DIR


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays of equal shape (peak 255)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, Z_DIM)).astype(np.float32))


@torch.no_grad()
def verifier_accuracy(weights_dir: Path = WEIGHTS_DIR) -> float:
    """Held-out accuracy of the verifier on uint8 inputs."""
    _, _, x, y = data.mnist_split()
    label, _ = VerifierForExport(load_trained("verifier", weights_dir))(torch.from_numpy(x).unsqueeze(-1))
    return float((label.squeeze(1).numpy() == y).mean())


@torch.no_grad()
def text_conditioning(weights_dir: Path = WEIGHTS_DIR, seeds: int = 20) -> tuple[float, dict[str, float]]:
    """``text_cond_acc`` and the per-digit accuracy."""
    from genimg.models.text_encoder import embed

    gen = GeneratorForExport(load_trained("generator", weights_dir))
    ver = VerifierForExport(load_trained("verifier", weights_dir))
    prompts = [p for d in range(10) for p in data.captions_for(d, data.EVAL_TEMPLATES)]
    digits = np.repeat(np.arange(10), len(data.EVAL_TEMPLATES))
    cond = torch.from_numpy(embed(prompts)).repeat_interleave(seeds, dim=0)
    target = np.repeat(digits, seeds)
    label, _ = ver(gen(_noise(len(cond), 1234), cond)[0])
    hit = label.squeeze(1).numpy() == target
    return float(hit.mean()), {str(d): float(hit[target == d].mean()) for d in range(10)}


@torch.no_grad()
def unconditional_balance(weights_dir: Path = WEIGHTS_DIR, n: int = 2000) -> tuple[float, list[float]]:
    """``uncond_min_class_frac`` and all ten class shares of empty-prompt samples."""
    gen = UncondGeneratorForExport(load_trained("generator", weights_dir))
    ver = VerifierForExport(load_trained("verifier", weights_dir))
    label, _ = ver(gen(_noise(n, 4321))[0])
    frac = np.bincount(label.squeeze(1).numpy(), minlength=10) / n
    return float(frac.min()), [round(float(f), 4) for f in frac]


@torch.no_grad()
def super_resolution(weights_dir: Path = WEIGHTS_DIR) -> tuple[float, float]:
    """(sr_psnr_db, bicubic_psnr_db), means over :data:`~genimg.models.data.SR_EVAL_IMAGES`."""
    up = UpscalerForExport(load_trained("upscaler", weights_dir))
    sr, bic = [], []
    for name in data.SR_EVAL_IMAGES:
        hr, lr = data.downscale_bicubic(data.load_skimage(name))
        out = up(torch.from_numpy(lr).unsqueeze(0))[0].numpy()
        x = torch.from_numpy(lr).permute(2, 0, 1).unsqueeze(1).float() / 255.0
        base = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
        base_u8 = torch.clamp(torch.round(base * 255.0), 0, 255).to(torch.uint8).squeeze(1).permute(1, 2, 0).numpy()
        sr.append(psnr_db(out, hr))
        bic.append(psnr_db(base_u8, hr))
    return float(np.mean(sr)), float(np.mean(bic))


@torch.no_grad()
def onnx_agreement(weights_dir: Path = WEIGHTS_DIR, onnx_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Max |ONNX Runtime − PyTorch| per model and output on the same random inputs (batch 8)."""
    import onnxruntime as ort

    from genimg.models import text_encoder as te

    tmp = None
    if onnx_dir is None:
        tmp = tempfile.TemporaryDirectory()
        onnx_dir = Path(tmp.name)
        export_all(onnx_dir, weights_dir)
    rng = np.random.default_rng(7)
    z = rng.standard_normal((8, Z_DIM)).astype(np.float32)
    c = rng.standard_normal((8, COND_DIM)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    img28 = rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    img_rgb = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    gen, up, ver = (load_trained("generator", weights_dir), load_trained("upscaler", weights_dir),
                    load_trained("verifier", weights_dir))
    tok = te.make_tokenizer(te.package_model_dir() / "tokenizer.json")
    prompts = ["a handwritten 7", "", "the number seven", "ünïcødé ✓ 数字", "x" * 600]
    cases = {
        "generator": ({"Z": z, "COND": c}, dict(zip(
            ("IMAGE", "FINITE"), GeneratorForExport(gen)(torch.from_numpy(z), torch.from_numpy(c)), strict=True))),
        "generator_uncond": ({"Z": z}, dict(zip(
            ("IMAGE", "FINITE"), UncondGeneratorForExport(gen)(torch.from_numpy(z)), strict=True))),
        "upscaler": ({"IMAGE": img_rgb}, {"UPSCALED": UpscalerForExport(up)(torch.from_numpy(img_rgb))}),
        "verifier": ({"IMAGE": img28}, dict(zip(
            ("LABEL", "SCORE"), VerifierForExport(ver)(torch.from_numpy(img28)), strict=True))),
        "text_encoder": (te.tokenize(tok, prompts), {"EMBEDDING": torch.from_numpy(te.embed(prompts))}),
    }
    result: dict[str, dict[str, float]] = {}
    for name, (feeds, ref) in cases.items():
        sess = ort.InferenceSession(str(onnx_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
        result[name] = {k: float(np.max(np.abs(outs[k].astype(np.float64) - v.numpy().astype(np.float64))))
                        for k, v in ref.items()}
    if tmp is not None:
        tmp.cleanup()
    return result


def evaluate(weights_dir: Path = WEIGHTS_DIR, onnx_dir: Path | None = None) -> dict:
    """Every figure listed in the module docstring, as one JSON-ready dict."""
    acc = verifier_accuracy(weights_dir)
    cond_acc, per_digit = text_conditioning(weights_dir)
    min_frac, fracs = unconditional_balance(weights_dir)
    sr, bic = super_resolution(weights_dir)
    diffs = onnx_agreement(weights_dir, onnx_dir)
    uint8_outputs = {"IMAGE", "UPSCALED", "LABEL", "FINITE"}
    flt = [v for d in diffs.values() for k, v in d.items() if k not in uint8_outputs]
    u8 = [v for d in diffs.values() for k, v in d.items() if k in uint8_outputs]
    return {
        "verifier_heldout_acc": round(acc, 4),
        "text_cond_acc": round(cond_acc, 4),
        "text_cond_acc_per_digit": per_digit,
        "uncond_min_class_frac": round(min_frac, 4),
        "uncond_class_fracs": fracs,
        "sr_psnr_db": round(sr, 3),
        "bicubic_psnr_db": round(bic, 3),
        "onnx_max_abs_diff": max(flt),
        "onnx_max_abs_diff_uint8": max(u8),
        "onnx_diffs": diffs,
    }


@torch.no_grad()
def contact_sheet(path: Path, weights_dir: Path = WEIGHTS_DIR, seeds: int = 10) -> Path:
    """Write a PNG: one row per digit prompt (an eval phrasing), ``seeds`` samples at 28 px then ×4 upscaled."""
    from PIL import Image, ImageDraw

    from genimg.models.text_encoder import embed

    gen = GeneratorForExport(load_trained("generator", weights_dir))
    up = UpscalerForExport(load_trained("upscaler", weights_dir))
    prompts = [data.EVAL_TEMPLATES[0].format(n=d, w=data.WORDS[d]) for d in range(10)]
    cond = torch.from_numpy(embed(prompts)).repeat_interleave(seeds, dim=0)
    small, _ = gen(_noise(len(cond), 99), cond)
    big = up(small).numpy()[..., 0]
    cell, label_w = 112, 180
    sheet = Image.new("L", (label_w + seeds * cell, 10 * cell), 0)
    draw = ImageDraw.Draw(sheet)
    for r in range(10):
        draw.text((4, r * cell + cell // 2), prompts[r], fill=255)
        for c in range(seeds):
            sheet.paste(Image.fromarray(big[r * seeds + c]), (label_w + c * cell, r * cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
