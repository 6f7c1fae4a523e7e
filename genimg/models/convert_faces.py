"""Convert the DCGAN face generator of ``gan-face-generate`` 1.1.1 to ONNX.

The network is the DCGAN generator (Radford, Metz & Chintala 2015,
https://arxiv.org/abs/1511.06434) in the layer plan of PyTorch's DCGAN faces
tutorial (nz 100, ngf 64, nc 3: transposed convolutions 100→512→256→128→64→3
with batch norm and ReLU, tanh output), rebuilt here and loaded from the
package's ``weights.tar`` (a torch zip checkpoint, key ``netG_state_dict``).

ONNX interface (dynamic batch B):

* ``Z`` float32 [B, 100], N(0, 1) noise (reshaped inside to [B, 100, 1, 1]);
* ``IMAGE`` uint8 [B, 64, 64, 3] RGB, HWC: ``clip(round((x + 1) * 127.5), 0, 255)``
  of the tanh output x, in float32, round half to even;
* ``FINITE`` bool [B, 1]: every float of the item's output is finite,
  computed before the uint8 cast.

Parity: ONNX Runtime against the package's own ``Generator`` (its
``models.py``, imported on its own) on the same noise: the max abs difference
of the float output and of the uint8 image.
"""

from __future__ import annotations

import warnings
from itertools import pairwise
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

NZ = 100
"""Noise length."""
NGF = 64
"""Feature maps of the last hidden layer."""
SIZE = 64
"""Output side in pixels."""
WEIGHTS = "gan_face_generate/weights.tar"
MODELS_PY = "gan_face_generate/models.py"
OPSET = 17
FLOAT_TOL = 1e-4
"""Largest float difference (tanh range) the parity check accepts."""


class DCGANGenerator(nn.Module):
    """DCGAN generator: float32 [B, 100, 1, 1] → float32 [B, 3, 64, 64] in [-1, 1].

    Layer indices of ``main`` match the published state dict (``main.0`` …
    ``main.12``): four (ConvTranspose2d, BatchNorm2d, ReLU) stages, then a
    ConvTranspose2d to 3 channels and tanh. Source: Radford et al. 2015.
    """

    def __init__(self, nz: int = NZ, ngf: int = NGF, nc: int = 3) -> None:
        super().__init__()
        chans = [nz, ngf * 8, ngf * 4, ngf * 2, ngf]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(pairwise(chans)):
            first = i == 0
            layers += [nn.ConvTranspose2d(cin, cout, 4, 1 if first else 2, 0 if first else 1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU()]
        layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class FacesForExport(Wrapping):
    """Serving form of a :class:`DCGANGenerator`: ``Z`` float32 [B, 100] → ``IMAGE`` uint8 [B, 64, 64, 3],
    ``FINITE`` bool [B, 1]."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.gen(z.reshape(-1, NZ, 1, 1))
        finite = torch.isfinite(x).flatten(1).all(dim=1, keepdim=True)
        return to_uint8(x, -1.0, 1.0).permute(0, 2, 3, 1), finite


def load_state(weights: Path) -> dict[str, torch.Tensor]:
    """The generator's state dict from the package's ``weights.tar`` (loaded with ``weights_only=True``).

    Raises:
        ModelError: the file is not a torch checkpoint with ``netG_state_dict``.
    """
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
        return ckpt["netG_state_dict"]
    except (RuntimeError, KeyError, TypeError, OSError) as e:
        raise ModelError(f"{weights}: not a checkpoint with netG_state_dict: {e}") from e


def build(weights: Path) -> DCGANGenerator:
    """:class:`DCGANGenerator` with the published weights, in eval mode.

    Raises:
        ModelError: the weights do not fit the network.
    """
    return with_weights(DCGANGenerator(), lambda: load_state(weights), f"{weights} does not fit the DCGAN generator")


def convert(files: dict[str, Path], out: Path) -> dict:
    """Write the faces ONNX file to ``out`` and check it against the package's own generator.

    Args:
        files: ``{path in the package: extracted file}``, with :data:`WEIGHTS` and :data:`MODELS_PY`.
        out: the ONNX file to write.

    Returns:
        parity figures: ``float_max_abs_diff``, ``uint8_max_abs_diff``, ``parity_batch``.

    Raises:
        ModelError: the weights do not load, or the parity check fails.
    """
    gen = build(files[WEIGHTS])
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((2, NZ)).astype(np.float32))
    batch = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False on purpose: the TorchScript exporter gives the same graph as genimg's own models
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export.*")
        torch.onnx.export(FacesForExport(gen), (z,), str(out), input_names=["Z"], output_names=["IMAGE", "FINITE"],
                          dynamic_axes={"Z": batch, "IMAGE": batch, "FINITE": batch}, opset_version=OPSET,
                          dynamo=False)
    return parity(out, files[WEIGHTS], files[MODELS_PY])


@torch.no_grad()
def parity(onnx_path: Path, weights: Path, models_py: Path, n: int = 16) -> dict:
    """Compare the ONNX file with the package's own ``Generator`` on ``n`` seeded noise vectors.

    Raises:
        ModelError: float difference above :data:`FLOAT_TOL`, uint8 difference above 1,
            or a non-finite flag.
    """
    theirs = load_source_file(models_py, "_genimg_parity_gan_face_generate_models")
    ref = theirs.Generator(0, 3, NZ, NGF)
    ref.load_state_dict(load_state(weights))
    ref.eval()
    z = np.random.default_rng(1).standard_normal((n, NZ)).astype(np.float32)
    expected = ref(torch.from_numpy(z).reshape(n, NZ, 1, 1)).numpy()
    tanh = last_output_of(onnx_path, "Tanh")
    got = run_with_tensors(onnx_path, {"Z": z}, [tanh])
    report = {
        "float_max_abs_diff": max_abs_diff(got[tanh], expected),
        "uint8_max_abs_diff": max_abs_diff(got["IMAGE"], quantize_pm1(expected).transpose(0, 2, 3, 1)),
        "parity_batch": n,
    }
    if report["float_max_abs_diff"] > FLOAT_TOL or report["uint8_max_abs_diff"] > 1 or not got["FINITE"].all():
        raise ModelError(f"faces: ONNX differs from gan_face_generate's Generator: {report}")
    return report
