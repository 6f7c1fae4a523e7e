"""Training loops for the generator, the upscaler and the verifier (CPU, deterministic per seed).

Each ``train_*`` writes a safetensors state dict plus a small JSON of its
training record into ``out_dir`` and returns the path of the weights.
Determinism: a fixed seed gives the same weights for the same torch build
and thread count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from genimg.models import data
from genimg.models.nets import COND_DIM, Z_DIM, Discriminator, Generator, Upscaler, Verifier

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict], None]
"""``progress(step, total_steps, figures)`` callback for a progress bar."""


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _save(module: torch.nn.Module, out_dir: Path, name: str, record: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    path = out_dir / f"{name}.safetensors"
    save_file(state, str(path))
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def caption_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of every training caption, grouped by digit.

    Returns:
        (embeddings float32 [10, T, 384], T = number of train templates) and the
        matching captions as an object array [10, T].
    """
    caps = [data.captions_for(d) for d in range(10)]
    flat = [c for row in caps for c in row]
    emb = data_embed(flat).reshape(10, len(caps[0]), COND_DIM)
    return emb, np.array(caps, dtype=object)


def data_embed(prompts: list[str]) -> np.ndarray:
    """Embed prompts with the text encoder (float32 [B, 384])."""
    from genimg.models.text_encoder import embed

    return embed(prompts)


def train_generator(out_dir: Path, *, seed: int = 0, epochs: int = 40, batch_size: int = 64,
                    cond_dropout: float = 0.15, aux_weight: float = 1.0, balance_weight: float = 1.0,
                    progress: Progress | None = None) -> Path:
    """Train the text-conditional DCGAN (hinge loss, projection D + AC-GAN head).

    Generator loss: hinge adversarial loss + ``aux_weight`` × cross-entropy of D's
    digit head on conditioned fakes + ``balance_weight`` × KL(mean class
    distribution of unconditioned fakes ‖ uniform), which keeps noise-only
    samples spread over all ten digits (marginal-entropy term of CatGAN,
    Springenberg 2015, https://arxiv.org/abs/1511.06390).
    """
    _seed_all(seed)
    x, y = data.load_mnist()
    real = torch.from_numpy(x).float().div(127.5).sub(1.0).unsqueeze(1)
    labels = torch.from_numpy(y)
    emb, _ = caption_embeddings()
    emb_t = torch.from_numpy(emb)
    n_tmpl = emb_t.shape[1]
    gen, disc = Generator(), Discriminator()
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(seed)

    def conds(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n_tmpl, (len(lab),), generator=g)
        c = emb_t[lab, idx]
        keep = torch.rand(len(lab), generator=g) >= cond_dropout
        return c * keep.unsqueeze(1), keep

    steps_per_epoch = len(real) // batch_size
    total = epochs * steps_per_epoch
    step, t0 = 0, time.monotonic()
    figures: dict = {}
    for epoch in range(epochs):
        perm = torch.randperm(len(real), generator=g)
        for i in range(steps_per_epoch):
            b = perm[i * batch_size:(i + 1) * batch_size]
            xr, yr = real[b], labels[b]
            cr, _ = conds(yr)
            yf = torch.randint(0, 10, (len(b),), generator=g)
            cf, keep_f = conds(yf)
            z = torch.randn(len(b), Z_DIM, generator=g)
            # Discriminator
            fake = gen(z, cf)
            lr_, ar = disc(xr, cr)
            lf, _ = disc(fake.detach(), cf)
            loss_d = F.relu(1 - lr_).mean() + F.relu(1 + lf).mean() + F.cross_entropy(ar, yr)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # Generator
            lf, af = disc(fake, cf)
            loss_g = -lf.mean()
            if keep_f.any():
                loss_g = loss_g + aux_weight * F.cross_entropy(af[keep_f], yf[keep_f])
            if (~keep_f).any():
                marg = torch.softmax(af[~keep_f], dim=1).mean(0)
                loss_g = loss_g + balance_weight * (marg * torch.log(marg * 10 + 1e-8)).sum()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            step += 1
            figures = {"epoch": epoch, "loss_d": round(loss_d.item(), 4), "loss_g": round(loss_g.item(), 4)}
            if progress:
                progress(step, total, figures)
    gen.eval()
    gen.reset_null()
    record = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "cond_dropout": cond_dropout,
              "seconds": round(time.monotonic() - t0, 1), "final": figures, "torch": torch.__version__}
    return _save(gen, out_dir, "generator", record)


def _sr_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """(high-res, low-res) float32 single-channel planes in [0, 1] for training."""
    pairs = []
    for name in data.SR_TRAIN_IMAGES:
        hr, lr = data.downscale_bicubic(data.load_skimage(name))
        for c in range(hr.shape[2]):
            pairs.append((hr[:, :, c].astype(np.float32) / 255.0, lr[:, :, c].astype(np.float32) / 255.0))
    return pairs


def train_upscaler(out_dir: Path, *, seed: int = 0, steps: int = 6000, batch_size: int = 16,
                   lr_patch: int = 24, progress: Progress | None = None) -> Path:
    """Train ESPCN ×4 on random aligned crops (L1 loss, Adam, cosine schedule)."""
    _seed_all(seed)
    pairs = [(hr, lr) for hr, lr in _sr_pairs() if min(lr.shape) >= lr_patch]
    rng = np.random.default_rng(seed)
    model = Upscaler()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0 = time.monotonic()
    loss_v = float("nan")
    for step in range(1, steps + 1):
        lrs, hrs = [], []
        for _ in range(batch_size):
            hr, lr = pairs[rng.integers(len(pairs))]
            i = rng.integers(0, lr.shape[0] - lr_patch + 1)
            j = rng.integers(0, lr.shape[1] - lr_patch + 1)
            lp = lr[i:i + lr_patch, j:j + lr_patch]
            hp = hr[4 * i:4 * (i + lr_patch), 4 * j:4 * (j + lr_patch)]
            if rng.random() < 0.5:
                lp, hp = lp[:, ::-1], hp[:, ::-1]
            k = int(rng.integers(4))
            lrs.append(np.rot90(lp, k).copy())
            hrs.append(np.rot90(hp, k).copy())
        xb = torch.from_numpy(np.stack(lrs)).unsqueeze(1)
        yb = torch.from_numpy(np.stack(hrs)).unsqueeze(1)
        loss = F.l1_loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_v = loss.item()
        if progress:
            progress(step, steps, {"l1": round(loss_v, 5)})
    model.eval()
    record = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr_patch": lr_patch,
              "train_images": list(data.SR_TRAIN_IMAGES), "seconds": round(time.monotonic() - t0, 1),
              "final_l1": round(loss_v, 5), "torch": torch.__version__}
    return _save(model, out_dir, "upscaler", record)


def _fit_verifier(seed: int, epochs: int, batch_size: int, progress: Progress | None) -> Verifier:
    """The digit classifier fitted on the 4,500 training digits (random ±2 px shifts), in eval mode."""
    _seed_all(seed)
    xtr, ytr, _, _ = data.mnist_split()
    x = torch.from_numpy(xtr).float().div(255.0).unsqueeze(1)
    y = torch.from_numpy(ytr)
    model = Verifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            b = perm[i * batch_size:(i + 1) * batch_size]
            xb = x[b]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, total, {"ce": round(loss.item(), 4)})
    return model.eval()


def train_verifier(out_dir: Path, *, seed: int = 0, epochs: int = 15, batch_size: int = 64,
                   progress: Progress | None = None) -> Path:
    """Train the digit classifier on 4,500 MNIST digits (random ±2 px shifts), 500 held out."""
    t0 = time.monotonic()
    model = _fit_verifier(seed, epochs, batch_size, progress)
    record = {"seed": seed, "epochs": epochs, "batch_size": batch_size,
              "seconds": round(time.monotonic() - t0, 1), "torch": torch.__version__}
    return _save(model, out_dir, "verifier", record)


def calibrate_null(weights_dir: Path, *, seed: int = 0, steps: int = 300, samples: int = 512,
                   anchor_weight: float = 1.0, judge_epochs: int = 5,
                   progress: Progress | None = None) -> Path:
    """Calibrate the generator's null condition so empty-prompt samples cover all ten digits.

    The generator's weights stay frozen; only ``null_proj`` (128 numbers, the
    projected "no prompt" condition) moves, by Adam on KL(mean class
    distribution ‖ uniform) of ``samples`` fresh samples a step, plus
    ``anchor_weight`` × its squared distance from the trained value. The
    classes come from an independent judge: a verifier fitted here with seed
    ``seed + 1000``, not the committed verifier that the eval uses.

    Returns:
        The rewritten ``generator.safetensors``.
    """
    from safetensors.torch import load_file

    t0 = time.monotonic()
    judge = _fit_verifier(seed + 1000, judge_epochs, 64, None)
    for p in judge.parameters():
        p.requires_grad_(False)
    _seed_all(seed)
    gen = Generator()
    missing, unexpected = gen.load_state_dict(load_file(str(weights_dir / "generator.safetensors")), strict=False)
    if unexpected or set(missing) - {"null_proj"}:
        raise ValueError(f"generator weights do not fit: missing {missing}, unexpected {unexpected}")
    gen.eval()
    if missing:
        gen.reset_null()
    for p in gen.parameters():
        p.requires_grad_(False)
    init = gen.null_proj.detach().clone()
    null = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([null], lr=0.01)
    g = torch.Generator().manual_seed(seed)

    def marginal(n: torch.Tensor) -> torch.Tensor:
        z = torch.randn(samples, Z_DIM, generator=g)
        x = gen._decode(torch.cat([z, n.expand(samples, -1)], dim=1))
        return torch.softmax(judge((x + 1.0) / 2.0), dim=1).mean(0)

    before = marginal(init).detach()
    for step in range(1, steps + 1):
        marg = marginal(null)
        kl = (marg * torch.log(marg * 10 + 1e-8)).sum()
        loss = kl + anchor_weight * ((null - init) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress(step, steps, {"kl": round(kl.item(), 5)})
    with torch.no_grad():
        gen.null_proj.copy_(null.detach())
    after = marginal(gen.null_proj).detach()
    record_path = weights_dir / "generator.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["null_calibration"] = {
        "seed": seed, "steps": steps, "samples": samples, "anchor_weight": anchor_weight,
        "judge": f"verifier seed {seed + 1000}, {judge_epochs} epochs",
        "judge_class_fracs_before": [round(float(v), 4) for v in before],
        "judge_class_fracs_after": [round(float(v), 4) for v in after],
        "seconds": round(time.monotonic() - t0, 1),
    }
    return _save(gen, weights_dir, "generator", record)
