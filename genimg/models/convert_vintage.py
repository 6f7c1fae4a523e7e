"""Convert the CycleGAN "modern → vintage" generator of ``vintagify`` 0.1.2 to ONNX.

The network is the CycleGAN ResNet generator with 9 residual blocks (Zhu et
al. 2017, https://arxiv.org/abs/1703.10593, after Johnson et al. 2016,
https://arxiv.org/abs/1603.08155) as the package's ``generator.py`` defines
it: reflection-padded 7×7 convolution, two stride-2 convolutions, nine
residual blocks, two stride-2 transposed convolutions, a 7×7 convolution and
tanh, with affine instance norm and ReLU between. Rebuilt here (the package's
``__init__`` imports torchvision) and loaded from
``resources/G_A2B_epoch33.pth``.

ONNX interface (dynamic batch B, height H and width W; H, W ≥ 8):

* ``IMAGE`` uint8 [B, H, W, 3] RGB;
* ``STYLED`` uint8 [B, H, W, 3]: the net's input is ``IMAGE / 127.5 - 1``
  (the package's ``ToTensor`` + ``Normalize(0.5, 0.5)``) in CHW, its tanh
  output y becomes ``clip(round((y + 1) * 127.5), 0, 255)`` in HWC. Sizes
  that are not a multiple of 4 come out of the net rounded up to one and are
  cropped back to H × W (bottom and right).

Parity: ONNX Runtime against the package's own ``ResnetGenerator`` (its
``generator.py`` imported on its own) on a seeded image.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genimg.errors import ModelError
from genimg.models.convert_util import (
    last_output_of,
    load_source_file,
    max_abs_diff,
    quantize_pm1,
    run_with_tensors,
)
from genimg.models.nets import Wrapping, to_uint8, with_weights

WEIGHTS = "vintagify/resources/G_A2B_epoch33.pth"
GENERATOR_PY = "vintagify/generator.py"
OPSET = 17
FLOAT_TOL = 1e-3
"""Largest float difference (tanh range) the parity check accepts."""


def _norm_relu(chans: int) -> list[nn.Module]:
    return [nn.InstanceNorm2d(chans, affine=True), nn.ReLU()]


class ResidualBlock(nn.Module):
    """x + (pad, conv3×3, IN, ReLU, pad, conv3×3, IN)(x); ``block.N`` indices match the published weights."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), *_norm_relu(dim),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class CycleGANGenerator(nn.Module):
    """ResNet-9 generator: float32 [B, 3, H, W] in [-1, 1] → float32 [B, 3, H', W'] in [-1, 1].

    H' = 4·ceil(ceil(H/2)/2) (H when H is a multiple of 4), W' likewise.
    ``model.N`` indices match the published state dict.
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), *_norm_relu(ngf)]
        ch = ngf
        for _ in range(2):
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), *_norm_relu(ch * 2)]
            ch *= 2
        layers += [ResidualBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1),
                       *_norm_relu(ch // 2)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class VintageForExport(Wrapping):
    """Serving form of a :class:`CycleGANGenerator`: ``IMAGE`` uint8 [B, H, W, 3] → ``STYLED`` uint8 [B, H, W, 3]."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[1], image.shape[2]
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        y = self.gen(x)[:, :, :h, :w]
        return to_uint8(y, -1.0, 1.0).permute(0, 2, 3, 1)


def build(weights: Path) -> CycleGANGenerator:
    """:class:`CycleGANGenerator` with the published weights (``weights_only`` load), in eval mode.

    Raises:
        ModelError: the file is not a state dict that fits the network.
    """
    return with_weights(CycleGANGenerator(), lambda: torch.load(weights, map_location="cpu", weights_only=True),
                        f"{weights} does not fit the CycleGAN ResNet-9 generator",
                        (RuntimeError, KeyError, TypeError, OSError))


def convert(files: dict[str, Path], out: Path) -> dict:
    """Write the vintage ONNX file to ``out`` and check it against the package's own generator.

    Args:
        files: ``{path in the package: extracted file}``, with :data:`WEIGHTS` and :data:`GENERATOR_PY`.
        out: the ONNX file to write.

    Returns:
        parity figures: ``float_max_abs_diff``, ``uint8_max_abs_diff``, ``parity_shape``,
        ``uint8_max_abs_diff_odd_size`` (H, W not multiples of 4, against the crop of
        the padded reference).

    Raises:
        ModelError: the weights do not load, or the parity check fails.
    """
    gen = build(files[WEIGHTS])
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    axes = {0: "batch", 1: "height", 2: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        # Known and harmless here: instance norm uses each image's own statistics by design, and the
        # reflection pads' strided slices are not constant-folded.
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True.*")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1 can be constant folded.*")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export.*")
        torch.onnx.export(VintageForExport(gen), (image,), str(out), input_names=["IMAGE"], output_names=["STYLED"],
                          dynamic_axes={"IMAGE": axes, "STYLED": axes}, opset_version=OPSET, dynamo=False)
    return parity(out, files[WEIGHTS], files[GENERATOR_PY])


def _test_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth seeded RGB image uint8 [1, h, w, 3] (gradients plus noise, so the net sees structure)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], axis=-1) * 200 + 20
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)[None]


@torch.no_grad()
def parity(onnx_path: Path, weights: Path, generator_py: Path, size: tuple[int, int] = (64, 48)) -> dict:
    """Compare the ONNX file with the package's own ``ResnetGenerator`` on seeded images.

    Raises:
        ModelError: float difference above :data:`FLOAT_TOL` or uint8 difference above 1.
    """
    theirs = load_source_file(generator_py, "_genimg_parity_vintagify_generator")
    ref = theirs.ResnetGenerator()
    ref.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    ref.eval()

    def reference(img: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return ref(x).numpy()

    tanh = last_output_of(onnx_path, "Tanh")
    img = _test_image(*size, seed=1)
    expected = reference(img)
    got = run_with_tensors(onnx_path, {"IMAGE": img}, [tanh])
    odd = _test_image(30, 42, seed=2)  # not multiples of 4: the reference sees the same input, padded output cropped
    odd_expected = reference(odd)[:, :, :30, :42]
    odd_got = run_with_tensors(onnx_path, {"IMAGE": odd}, [])["STYLED"]
    diff = max_abs_diff(got[tanh], expected)
    diff_u8 = max_abs_diff(got["STYLED"], quantize_pm1(expected).transpose(0, 2, 3, 1))
    diff_odd = max_abs_diff(odd_got, quantize_pm1(odd_expected).transpose(0, 2, 3, 1))
    report = {"float_max_abs_diff": diff, "uint8_max_abs_diff": diff_u8, "uint8_max_abs_diff_odd_size": diff_odd,
              "parity_shape": [1, *size, 3]}
    if diff > FLOAT_TOL or diff_u8 > 1 or diff_odd > 1:
        raise ModelError(f"vintage: ONNX differs from vintagify's ResnetGenerator: {report}")
    return report
