"""Pixels to files: float→uint8 conversion, finiteness check, encode/decode, perceptual hash, contact sheets.

Conventions used throughout:

* An *image* is a ``numpy.ndarray`` of dtype ``uint8`` and shape ``[H, W, C]``
  (HWC) with ``C`` in ``{1, 3, 4}`` (grayscale, RGB, RGBA), row 0 at the top.
* Model outputs may instead be float in ``[low, high]`` (``[-1, 1]`` for a tanh
  generator) and/or channel-first ``[C, H, W]``; :func:`to_uint8` turns those
  into images.
* Encoding is deterministic: the same pixels and options give the same bytes,
  with no timestamps or other metadata, so a retried shard is byte-identical.

No function here lets a numpy floating-point warning escape (case C9).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from genimg.errors import NonFiniteOutputError, PayloadTooLargeError, ValidationError

logger = logging.getLogger(__name__)

ImageFormat = Literal["png", "webp", "jpeg"]

FORMATS: tuple[str, ...] = ("png", "webp", "jpeg")
"""Supported encodings, as given in a job spec."""

EXTENSIONS: dict[str, str] = {"png": "png", "webp": "webp", "jpeg": "jpg"}
"""File extension (no dot) per format, as used for WebDataset tar members."""

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
"""HTTP content type per format."""

PNG_COMPRESS_LEVEL = 6
"""zlib level used for every PNG (0-9); fixed so output bytes never vary."""

WEBP_METHOD = 4
"""libwebp effort (0-6) used for every WebP; fixed so output bytes never vary."""

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Largest image (width × height, pixels) :func:`decode` accepts."""


def check_finite(array: np.ndarray) -> None:
    """Raise unless every element of ``array`` is finite.

    Integer and boolean arrays are finite by construction and always pass. An
    all-zero (black) float image is valid and passes.

    Args:
        array: any shape and numeric dtype (model output, e.g. float32 ``[C, H, W]``).

    Raises:
        NonFiniteOutputError: at least one NaN, +inf or -inf; the message gives
            the counts of each.
    """
    a = np.asarray(array)
    if not np.issubdtype(a.dtype, np.inexact):
        return
    # isfinite/isnan/isinf never emit RuntimeWarnings, so nothing can escape here.
    finite = np.isfinite(a)
    if bool(finite.all()):
        return
    n_nan = int(np.count_nonzero(np.isnan(a)))
    n_inf = int(a.size - np.count_nonzero(finite) - n_nan)
    raise NonFiniteOutputError(
        f"model output has {n_nan} NaN and {n_inf} infinite values out of {a.size}"
    )


def to_uint8(
    array: np.ndarray,
    low: float = -1.0,
    high: float = 1.0,
    layout: Literal["HWC", "CHW"] = "HWC",
) -> np.ndarray:
    """Convert a model output to a uint8 HWC image, saturating and rounding.

    Float values are mapped linearly from ``[low, high]`` to ``[0, 255]``,
    clipped (so 1.02 → 255 and -1.05 → 0: never wrap-around) and rounded to
    the nearest integer (ties to even). uint8 input is only re-laid-out.

    Args:
        array: float or uint8, ``[..., H, W, C]`` (``layout="HWC"``),
            ``[..., C, H, W]`` (``layout="CHW"``) or ``[H, W]`` (grayscale); any
            leading dimensions (e.g. a batch ``N``) are kept.
        low: the value that maps to 0.
        high: the value that maps to 255; must be greater than ``low``.
        layout: channel order of ``array``.

    Returns:
        uint8 ``[..., H, W, C]`` (``[H, W, 1]`` for 2-D input), C-contiguous.

    Raises:
        NonFiniteOutputError: ``array`` holds NaN or infinity (checked first).
        ValidationError: bad ``layout``, ``low >= high``, an unsupported dtype
            (integers other than uint8) or too few dimensions.
    """
    a = np.asarray(array)
    if layout not in ("HWC", "CHW"):
        raise ValidationError(f"layout must be 'HWC' or 'CHW', got {layout!r}", field="layout")
    if not high > low:
        raise ValidationError(f"need low < high, got low={low} high={high}", field="high")
    if a.ndim == 2:
        a = a[:, :, None] if layout == "HWC" else a[None, :, :]
    if a.ndim < 3:
        raise ValidationError(f"expected at least 2 dimensions, got shape {a.shape}")
    if layout == "CHW":
        a = np.moveaxis(a, -3, -1)

    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValidationError(f"expected a float or uint8 array, got dtype {a.dtype}")
    check_finite(a)
    work = np.float64 if a.dtype == np.float64 else np.float32
    scale = 255.0 / (float(high) - float(low))
    with np.errstate(all="ignore"):  # finite input: nothing to warn about; belt and braces
        scaled = (a.astype(work, copy=False) - np.asarray(low, dtype=work)) * np.asarray(scale, dtype=work)
        np.clip(scaled, 0.0, 255.0, out=scaled)
        np.rint(scaled, out=scaled)
    return np.ascontiguousarray(scaled.astype(np.uint8))


def _as_pil(image: np.ndarray) -> Image.Image:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValidationError(f"image must be uint8, got {a.dtype}; convert with to_uint8()")
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValidationError(f"image must be [H, W, C] with C in 1, 3, 4; got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValidationError(f"image is empty: shape {a.shape}")
    a = np.ascontiguousarray(a[:, :, 0] if a.shape[2] == 1 else a)
    return Image.fromarray(a)  # [H,W] → "L", [H,W,3] → "RGB", [H,W,4] → "RGBA"


def encode(
    image: np.ndarray,
    fmt: str = "png",
    quality: int = 90,
    *,
    lossless: bool = False,
) -> bytes:
    """Encode an image to PNG, WebP or JPEG bytes, deterministically.

    The same pixels and options always give the same bytes: PNG uses a fixed
    zlib level (:data:`PNG_COMPRESS_LEVEL`) and writes no text, time or other
    metadata chunks; WebP uses a fixed effort (:data:`WEBP_METHOD`) and no
    EXIF/XMP/ICC; JPEG uses fixed 4:2:0 subsampling and no optimisation passes.
    Grayscale ``[H, W, 1]`` is saved as mode ``L`` (WebP has no grayscale mode,
    so libwebp stores it as RGB; it decodes to ``[H, W, 3]``).

    Args:
        image: uint8 ``[H, W, C]``, C in ``{1, 3, 4}`` (4 = RGBA; not for JPEG).
        fmt: ``"png"``, ``"webp"`` or ``"jpeg"``.
        quality: 1-100 for JPEG and lossy WebP; ignored by PNG; for lossless
            WebP it is libwebp's compression effort.
        lossless: WebP only: lossless encoding (pixels round-trip exactly).

    Returns:
        The encoded file's bytes.

    Raises:
        ValidationError: unknown format, quality out of range, or a bad image
            shape/dtype.
    """
    if fmt not in FORMATS:
        raise ValidationError(f"format must be one of {FORMATS}, got {fmt!r}", field="format")
    if not 1 <= int(quality) <= 100:
        raise ValidationError(f"quality must be in 1..100, got {quality}", field="quality")
    pil = _as_pil(image)
    buf = io.BytesIO()
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    elif fmt == "webp":
        pil.save(
            buf,
            format="WEBP",
            lossless=bool(lossless),
            quality=int(quality),
            method=WEBP_METHOD,
            exact=bool(lossless),
        )
    else:
        if pil.mode == "RGBA":
            raise ValidationError("JPEG cannot store an alpha channel", field="format")
        pil.save(
            buf,
            format="JPEG",
            quality=int(quality),
            subsampling="4:2:0",
            optimize=False,
            progressive=False,
        )
    return buf.getvalue()


PHASH_BITS = 64
"""Bits of :func:`phash` (an 8x8 DCT block)."""


def phash(image: np.ndarray) -> str:
    """The image's 64-bit perceptual hash, as 16 lowercase hex digits (``imagehash.phash``, hash size 8).

    The pixels are reduced to grey and resized to 32x32, their 2-D DCT taken, and
    each of the 8x8 lowest frequencies compared with their median (Zauner 2010,
    "Implementation and Benchmarking of Perceptual Image Hash Functions"; the
    ``imagehash`` library's ``phash``). Similar images differ in few bits
    (:mod:`genimg.dedup` compares them by Hamming distance). About 0.3 ms for a
    112x112 grey image, 1 ms for 256x256 RGB, on one core.

    Args:
        image: uint8 ``[H, W, C]``, C in ``{1, 3, 4}`` (the pixels before lossy encoding).

    Raises:
        ValidationError: a bad image shape/dtype.
    """
    return phashes(np.asarray(image)[None])[0]


def phashes(images: Sequence[np.ndarray] | np.ndarray) -> list[str]:
    """:func:`phash` of each image of a batch, the same strings, with the DCT, median and bits done once for all.

    Per image only the grey conversion and the 32x32 Lanczos resize run (PIL, as
    ``imagehash.phash`` does them); the 2-D DCT (``scipy.fftpack.dct``, the same
    transform ``imagehash`` calls), the medians and the hex digits run on the
    whole batch: about 0.15 ms of CPU per 112x112 grey image where
    ``imagehash.phash`` takes 0.25 (``tests/test_imaging.py`` holds them equal).

    Args:
        images: uint8 ``[B, H, W, C]``, or ``B`` arrays ``[H, W, C]``; C in ``{1, 3, 4}`` (the pixels
            before lossy encoding).

    Returns:
        ``B`` strings of 16 lowercase hex digits.

    Raises:
        ValidationError: a bad image shape/dtype.
    """
    from scipy.fftpack import dct

    side = 4 * 8  # imagehash: hash_size 8, highfreq_factor 4
    small = np.empty((len(images), side, side), dtype=np.float64)
    for k, image in enumerate(images):
        small[k] = np.asarray(_as_pil(image).convert("L").resize((side, side), Image.Resampling.LANCZOS))
    low = dct(dct(small, axis=1), axis=2)[:, :8, :8].reshape(len(images), PHASH_BITS)
    bits = low > np.median(low, axis=1, keepdims=True)
    return [row.tobytes().hex() for row in np.packbits(bits, axis=1)]


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/WebP/JPEG bytes to a uint8 HWC array.

    Args:
        data: an encoded image file.
        max_pixels: largest accepted width × height, checked before pixels are
            decoded (protects against decompression bombs).

    Returns:
        uint8 ``[H, W, 1]`` for grayscale, ``[H, W, 3]`` for RGB,
        ``[H, W, 4]`` for images with alpha; palette and other modes are
        converted to RGB(A).

    Raises:
        ValidationError: the bytes are not a decodable image.
        PayloadTooLargeError: the image has more than ``max_pixels`` pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as opened:
            im: Image.Image = opened
            w, h = im.size
            if w * h > max_pixels:
                raise PayloadTooLargeError(f"image is {w}x{h} pixels, above max_pixels={max_pixels}")
            if im.mode not in ("L", "RGB", "RGBA"):
                has_alpha = "A" in im.getbands() or "transparency" in im.info
                im = im.convert("RGBA" if has_alpha else "RGB")
            else:
                im.load()
            arr = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise PayloadTooLargeError(f"image too large to decode: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValidationError(f"not a decodable image: {e}") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def _fit_caption(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width_px: int,
    max_lines: int,
) -> list[str]:
    """Greedy word wrap of ``text`` into at most ``max_lines`` lines of ``width_px``."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width_px or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width_px:
            last = last[:-1]
        lines[-1] = last + "..."
    # A single over-long word still must not spill into the next cell.
    out = []
    for line in lines:
        while len(line) > 1 and draw.textlength(line, font=font) > width_px:
            line = line[:-1]
        out.append(line)
    return out


def contact_sheet(
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    cols: int = 8,
    *,
    caption_lines: int = 2,
    padding_px: int = 4,
    font_size_px: int = 11,
    min_cell_width_px: int = 0,
) -> Image.Image:
    """Lay images out on a grid with each caption (e.g. the prompt) written under its image.

    Cells are as large as the largest image; smaller images are centred. Text
    uses PIL's default font and is word-wrapped and cut to ``caption_lines``.
    For PNG bytes use ``encode(numpy.asarray(sheet), "png")``.

    Args:
        images: uint8 ``[H, W, C]`` arrays, C in ``{1, 3, 4}``; grayscale and
            RGBA are shown as RGB.
        captions: one string per image, or ``None`` for no text.
        cols: images per row (the sheet has ``ceil(len(images) / cols)`` rows).
        caption_lines: lines of text reserved under each image.
        padding_px: gap around each cell, in pixels.
        font_size_px: size of the default font, in pixels.
        min_cell_width_px: cells are at least this wide (room for long captions, e.g. revised prompts).

    Returns:
        An RGB ``PIL.Image.Image`` on a white background.

    Raises:
        ValidationError: no images, ``cols < 1``, a caption count that differs
            from the image count, or a bad image shape/dtype.
    """
    if not images:
        raise ValidationError("contact_sheet needs at least one image")
    if cols < 1:
        raise ValidationError(f"cols must be >= 1, got {cols}", field="cols")
    if captions is not None and len(captions) != len(images):
        raise ValidationError(f"{len(captions)} captions for {len(images)} images", field="captions")
    tiles = [_as_pil(im).convert("RGB") for im in images]
    cell_w = max(max(t.width for t in tiles), min_cell_width_px)
    cell_h = max(t.height for t in tiles)
    font = ImageFont.load_default(size=font_size_px)
    freetype = isinstance(font, ImageFont.FreeTypeFont)
    line_h = font_size_px + 3
    text_h = line_h * caption_lines if captions is not None else 0
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    pitch_w = cell_w + 2 * padding_px
    pitch_h = cell_h + text_h + 2 * padding_px
    sheet = Image.new("RGB", (cols * pitch_w, rows * pitch_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        x0, y0 = c * pitch_w + padding_px, r * pitch_h + padding_px
        sheet.paste(tile, (x0 + (cell_w - tile.width) // 2, y0 + (cell_h - tile.height) // 2))
        if captions is None:
            continue
        text = str(captions[i])
        if not freetype:  # the bitmap fallback font only has Latin-1 glyphs
            text = text.encode("latin-1", "replace").decode("latin-1")
        for j, line in enumerate(_fit_caption(draw, text, font, cell_w, caption_lines)):
            draw.text((x0, y0 + cell_h + 1 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet
