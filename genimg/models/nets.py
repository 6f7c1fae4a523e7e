"""The PyTorch networks genimg trains and exports.

* :class:`Generator` — DCGAN generator (Radford, Metz & Chintala 2015,
  https://arxiv.org/abs/1511.06434) with the layer plan genimg was specified
  with: z (100) → dense 128×7×7 → LeakyReLU → transposed convolutions → 28×28×1
  → tanh. It is made text-conditional by **concatenation** of a learned
  projection of the 384-d prompt embedding with z (the conditional GAN of
  Mirza & Osindero 2014, https://arxiv.org/abs/1411.1784). An all-zero
  embedding is the "no prompt" condition (condition dropout during training).
* :class:`Discriminator` — DCGAN discriminator with a **projection** term
  (Miyato & Koyama 2018, https://arxiv.org/abs/1802.05637) on the prompt
  embedding and an **auxiliary classifier** head over the 10 digits (AC-GAN,
  Odena, Olah & Shlens 2017, https://arxiv.org/abs/1610.09585).
* :class:`Upscaler` — ESPCN ×4 super-resolution (Shi et al. 2016,
  https://arxiv.org/abs/1609.05158) on one channel, applied to each channel of
  a 1- or 3-channel image, predicting a residual over bicubic upsampling
  (residual learning as in VDSR, Kim et al. 2016, https://arxiv.org/abs/1511.04587).
* :class:`Verifier` — a small CNN digit classifier (LeNet-style; LeCun et al. 1998).

The ``*ForExport`` wrappers give the serving contract: uint8 NHWC images in and
out, conversion to uint8 saturating and rounding (case C10).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from genimg.contract import EMBED_DIM as COND_DIM  # the prompt embedding (all-MiniLM-L6-v2)
from genimg.contract import NUM_CLASSES, SCALE, Z_DIM
from genimg.errors import ModelError


class Wrapping(nn.Module):
    """Base of a serving form (``*ForExport``) of a fetched network: the wrapped network is ``self.gen``."""

    def __init__(self, gen: nn.Module) -> None:
        super().__init__()
        self.gen = gen


N = TypeVar("N", bound=nn.Module)


def with_weights(net: N, load: Callable[[], Mapping[str, torch.Tensor]], what: str,
                 errors: tuple[type[BaseException], ...] = (RuntimeError,)) -> N:
    """``net`` with the state dict that ``load()`` returns, in eval mode.

    Raises:
        ModelError: ``load()`` or ``load_state_dict`` raised one of ``errors`` (message ``"{what}: {error}"``).
    """
    try:
        net.load_state_dict(load())
    except errors as e:
        raise ModelError(f"{what}: {e}") from e
    return net.eval()


def to_uint8(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map floats in [low, high] to uint8 [0, 255], rounding and saturating.

    NaN becomes 0 after clamping is impossible to define; callers check
    finiteness on the float side (the worker does, case C9).

    Args:
        x: float tensor of any shape.
        low: value that maps to 0.
        high: value that maps to 255.

    Returns:
        uint8 tensor of the same shape.
    """
    y = (x - low) * (255.0 / (high - low))
    return torch.clamp(torch.round(y), 0.0, 255.0).to(torch.uint8)


class Generator(nn.Module):
    """Text-conditional DCGAN generator.

    Input ``z`` float32 [B, 100] ~ N(0, 1) and ``cond`` float32 [B, 384] (a
    unit-norm prompt embedding, or zeros for "no prompt" as in training's
    condition dropout); output float32 [B, 1, 28, 28] in [-1, 1].

    :meth:`uncond` is the "no prompt" path used for noise-only jobs: the
    projected condition is the ``null_proj`` buffer, which starts as
    ``cond_proj(0)`` and is then calibrated with the generator frozen
    (:func:`genimg.models.train.calibrate_null`) so that empty-prompt samples
    cover all digits — the learned null condition of classifier-free
    guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).
    """

    null_proj: torch.Tensor  # a registered buffer, float32 [cond_proj_dim]

    def __init__(self, cond_proj_dim: int = 128) -> None:
        super().__init__()
        self.cond_proj = nn.Sequential(nn.Linear(COND_DIM, cond_proj_dim), nn.LeakyReLU(0.2))
        self.fc = nn.Linear(Z_DIM + cond_proj_dim, 128 * 7 * 7)
        self.bn0 = nn.BatchNorm1d(128 * 7 * 7)
        self.up1 = nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1)  # 7 -> 14
        self.bn1 = nn.BatchNorm2d(64)
        self.up2 = nn.ConvTranspose2d(64, 1, 4, stride=2, padding=1)  # 14 -> 28
        self.register_buffer("null_proj", torch.zeros(cond_proj_dim))

    def reset_null(self) -> None:
        """Set ``null_proj`` to the projection of the all-zero condition used in training."""
        with torch.no_grad():
            self.null_proj.copy_(self.cond_proj(torch.zeros(1, COND_DIM))[0])

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._decode(torch.cat([z, self.cond_proj(cond)], dim=1))

    def uncond(self, z: torch.Tensor) -> torch.Tensor:
        """Samples without a prompt: float32 [B, 1, 28, 28] in [-1, 1]."""
        return self._decode(torch.cat([z, self.null_proj.to(z.dtype).expand(z.shape[0], -1)], dim=1))

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.bn0(self.fc(h)), 0.2).view(-1, 128, 7, 7)
        h = F.leaky_relu(self.bn1(self.up1(h)), 0.2)
        return torch.tanh(self.up2(h))


class Discriminator(nn.Module):
    """Projection discriminator with an auxiliary digit classifier.

    Input images float32 [B, 1, 28, 28] in [-1, 1] and ``cond`` [B, 384];
    returns (real/fake logit [B], class logits [B, 10]).
    """

    def __init__(self) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm
        self.features = nn.Sequential(
            sn(nn.Conv2d(1, 64, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # 14
            sn(nn.Conv2d(64, 128, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # 7
            nn.Flatten(),
            sn(nn.Linear(128 * 7 * 7, 256)), nn.LeakyReLU(0.2),
        )
        self.adv = sn(nn.Linear(256, 1))
        self.embed = sn(nn.Linear(COND_DIM, 256, bias=False))
        self.aux = nn.Linear(256, NUM_CLASSES)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        logit = self.adv(h).squeeze(1) + (self.embed(cond) * h).sum(dim=1)
        return logit, self.aux(h)


class Upscaler(nn.Module):
    """ESPCN ×4 on one channel, residual over bicubic.

    ESPCN's sub-pixel convolution head with a deeper feature extractor (ReLU
    3×3 layers as in FSRCNN's mapping stage, Dong et al. 2016,
    https://arxiv.org/abs/1608.00367). Input float32 [B, 1, H, W] in [0, 1];
    output float32 [B, 1, 4H, 4W] (unclamped; the export wrapper saturates).
    """

    def __init__(self, channels: int = 64, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 5, padding=2), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(channels, SCALE * SCALE, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.shuffle = nn.PixelShuffle(SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(x, scale_factor=SCALE, mode="bicubic", align_corners=False)
        return base + self.shuffle(self.body(x))


class Verifier(nn.Module):
    """Small CNN digit classifier: float32 [B, 1, 28, 28] in [0, 1] → logits [B, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 14
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 7
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _serve_image(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [B, 1, H, W] in [-1, 1] → (uint8 [B, H, W, 1], bool [B, 1] all-finite flag).

    The flag is computed on the float output, before the uint8 cast would hide
    NaN or inf (case C9); the worker drops items whose flag is false.
    """
    finite = torch.isfinite(x).flatten(1).all(dim=1, keepdim=True)
    return to_uint8(x, -1.0, 1.0).permute(0, 2, 3, 1), finite


class GeneratorForExport(nn.Module):
    """Serving form: ``Z`` [B, 100], ``COND`` [B, 384] → ``IMAGE`` uint8 [B, 28, 28, 1], ``FINITE`` bool [B, 1]."""

    def __init__(self, gen: Generator) -> None:
        super().__init__()
        self.gen = gen

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _serve_image(self.gen(z, cond))


class UncondGeneratorForExport(nn.Module):
    """Serving form without a prompt: ``Z`` [B, 100] → ``IMAGE`` uint8 [B, 28, 28, 1], ``FINITE`` bool [B, 1].

    The condition is the generator's calibrated null condition (:meth:`Generator.uncond`).
    """

    def __init__(self, gen: Generator) -> None:
        super().__init__()
        self.gen = gen

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _serve_image(self.gen.uncond(z))


class UpscalerForExport(nn.Module):
    """Serving form: ``IMAGE`` uint8 [B, H, W, C] (C = 1 or 3) → uint8 [B, 4H, 4W, C]."""

    def __init__(self, up: Upscaler) -> None:
        super().__init__()
        self.up = up

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b, h, w, c = image.shape
        x = image.permute(0, 3, 1, 2).reshape(b * c, 1, h, w).to(torch.float32) / 255.0
        y = to_uint8(self.up(x), 0.0, 1.0)
        return y.reshape(b, c, h * SCALE, w * SCALE).permute(0, 2, 3, 1)


class VerifierForExport(nn.Module):
    """Serving form: ``IMAGE`` uint8 [B, 28, 28, 1] → ``LABEL`` int32 [B, 1], ``SCORE`` float32 [B, 1].

    ``SCORE`` is the softmax probability of ``LABEL``.
    """

    def __init__(self, ver: Verifier) -> None:
        super().__init__()
        self.ver = ver

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        prob = torch.softmax(self.ver(x), dim=1)
        score, label = torch.max(prob, dim=1, keepdim=True)
        return label.to(torch.int32), score
