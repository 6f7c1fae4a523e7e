"""Pixel conversion, finiteness, deterministic encoding and contact sheets (cases C9, C10)."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from genimg.errors import NonFiniteOutputError, ValidationError
from genimg.imaging import check_finite, contact_sheet, decode, encode, phash, phashes, to_uint8


@pytest.fixture(autouse=True)
def _numpy_warnings_are_errors():
    with warnings.catch_warnings(), np.errstate(all="warn"):
        warnings.simplefilter("error")
        yield


def _red(h: int = 8, w: int = 8) -> np.ndarray:
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = 255
    return img


# --------------------------------------------------------------------------- C10: conversion


def test_to_uint8_saturates_out_of_range_values_instead_of_wrapping():
    chw = np.array([1.02, -1.05, 1.0, -1.0], dtype=np.float32).reshape(4, 1, 1)
    out = to_uint8(chw, layout="CHW")
    assert out.dtype == np.uint8
    assert out.shape == (1, 1, 4)
    assert out.ravel().tolist() == [255, 0, 255, 0]


def test_to_uint8_rounds_to_nearest_and_maps_zero_to_mid_grey():
    x = np.array([[[-1.0], [0.0], [1.0], [-0.999], [0.5]]], dtype=np.float32)  # HWC [1, 5, 1]
    assert to_uint8(x).ravel().tolist() == [0, 128, 255, 0, 191]


def test_to_uint8_transposes_chw_to_hwc():
    chw = np.stack([np.full((2, 3), 1.0), np.full((2, 3), -1.0), np.full((2, 3), 0.0)]).astype(np.float32)
    out = to_uint8(chw, layout="CHW")
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [255, 0, 128]
    assert out.flags["C_CONTIGUOUS"]


def test_to_uint8_keeps_a_leading_batch_dimension():
    batch = np.zeros((5, 1, 28, 28), dtype=np.float32)  # NCHW
    assert to_uint8(batch, layout="CHW").shape == (5, 28, 28, 1)


def test_to_uint8_supports_a_zero_to_one_range_and_passes_uint8_through():
    assert to_uint8(np.array([[[0.0, 0.5, 1.0]]]), low=0.0, high=1.0).ravel().tolist() == [0, 128, 255]
    u8 = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    assert np.array_equal(to_uint8(u8), u8)


@pytest.mark.parametrize("bad", [np.arange(4, dtype=np.int32).reshape(1, 2, 2), np.zeros(3, np.float32)])
def test_to_uint8_rejects_other_integer_dtypes_and_1d_arrays(bad):
    with pytest.raises(ValidationError):
        to_uint8(bad)


# --------------------------------------------------------------------------- C9: non-finite output


def _one_percent_nan() -> np.ndarray:
    x = np.zeros((1, 28, 28), dtype=np.float32).ravel()
    x[:: 100] = np.nan
    return x.reshape(1, 28, 28)


def _one_inf() -> np.ndarray:
    x = np.zeros((3, 8, 8), dtype=np.float32)
    x[1, 2, 3] = np.inf
    return x


@pytest.mark.parametrize(
    "array",
    [np.full((1, 28, 28), np.nan, dtype=np.float32), _one_percent_nan(), _one_inf()],
    ids=["all-nan", "one-percent-nan", "one-plus-inf"],
)
def test_non_finite_outputs_are_rejected_without_any_numpy_warning(array):
    with pytest.raises(NonFiniteOutputError) as info:
        check_finite(array)
    assert info.value.reason == "non_finite_output"
    with pytest.raises(NonFiniteOutputError):
        to_uint8(array, layout="CHW")


def test_all_zero_black_output_is_accepted_and_converts_to_mid_grey_or_black():
    zeros = np.zeros((1, 28, 28), dtype=np.float32)
    check_finite(zeros)
    assert (to_uint8(zeros, layout="CHW") == 128).all()
    assert (to_uint8(zeros, low=0.0, high=1.0, layout="CHW") == 0).all()
    assert decode(encode(to_uint8(zeros, low=0.0, high=1.0, layout="CHW"), "png")).max() == 0


def test_check_finite_counts_nan_and_inf_in_its_message():
    x = np.array([np.nan, np.inf, -np.inf, 0.0], dtype=np.float64)
    with pytest.raises(NonFiniteOutputError, match="1 NaN and 2 infinite"):
        check_finite(x)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("fmt, kwargs", [("png", {}), ("webp", {"lossless": True})], ids=["png", "webp-lossless"])
def test_red_image_decodes_to_rgb_with_every_pixel_255_0_0(fmt, kwargs):
    data = encode(_red(), fmt, **kwargs)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        assert im.format == {"png": "PNG", "webp": "WEBP"}[fmt]
    out = decode(data)
    assert out.shape == (8, 8, 3)
    assert (out.reshape(-1, 3) == [255, 0, 0]).all()


def test_red_float_chw_output_goes_through_conversion_to_an_exact_red_png():
    chw = np.stack([np.full((8, 8), 1.02), np.full((8, 8), -1.05), np.full((8, 8), -1.0)]).astype(np.float32)
    out = decode(encode(to_uint8(chw, layout="CHW"), "png"))
    assert (out.reshape(-1, 3) == [255, 0, 0]).all()


@pytest.mark.parametrize(
    "fmt, kwargs", [("png", {}), ("webp", {"lossless": True}), ("webp", {"quality": 80}), ("jpeg", {"quality": 90})]
)
def test_encoding_is_deterministic(fmt, kwargs):
    img = np.random.default_rng(0).integers(0, 256, size=(32, 24, 3), dtype=np.uint8)
    assert encode(img, fmt, **kwargs) == encode(img.copy(), fmt, **kwargs)


def _png_chunk_types(data: bytes) -> list[bytes]:
    types, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        types.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return types


def test_png_has_no_time_text_or_other_metadata_chunks():
    types = _png_chunk_types(encode(_red(), "png"))
    assert set(types) <= {b"IHDR", b"IDAT", b"IEND"}, types


def test_grayscale_hw1_is_saved_as_mode_l_and_round_trips_exactly():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    data = encode(gray, "png")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
    assert np.array_equal(decode(data), gray)
    with Image.open(io.BytesIO(encode(gray, "jpeg"))) as im:
        assert im.mode == "L"


def test_lossless_webp_round_trips_arbitrary_rgb_exactly():
    img = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    assert np.array_equal(decode(encode(img, "webp", lossless=True)), img)


@pytest.mark.parametrize(
    "image, fmt, quality",
    [
        (np.zeros((8, 8, 3), np.float32), "png", 90),
        (np.zeros((8, 8, 2), np.uint8), "png", 90),
        (np.zeros((8, 8, 3), np.uint8), "gif", 90),
        (np.zeros((8, 8, 3), np.uint8), "jpeg", 0),
        (np.zeros((8, 8, 4), np.uint8), "jpeg", 90),
    ],
    ids=["float", "two-channels", "unknown-format", "quality-0", "jpeg-alpha"],
)
def test_encode_rejects_bad_images_formats_and_qualities(image, fmt, quality):
    with pytest.raises(ValidationError):
        encode(image, fmt, quality)


def test_decode_rejects_bytes_that_are_not_an_image():
    with pytest.raises(ValidationError):
        decode(b"definitely not a png")


# --------------------------------------------------------------------------- contact sheet


def test_contact_sheet_lays_out_images_in_columns_with_captions_under_them():
    images = [_red(28, 28)] * 5 + [np.full((28, 28, 1), 200, np.uint8)]
    captions = [f"a handwritten digit {i} written rather carefully" for i in range(6)]
    sheet = contact_sheet(images, captions, cols=4, padding_px=2)
    assert sheet.mode == "RGB"
    assert sheet.width == 4 * (28 + 4)
    px = np.asarray(sheet)
    assert px[2 + 14, 2 + 14].tolist() == [255, 0, 0], "first image at the top-left cell"
    caption_band = px[2 + 28 : 2 + 28 + 20, 2 : 2 + 28]
    assert (caption_band < 128).any(), "caption text is drawn under the image"
    assert sheet.height > 2 * (28 + 4), "two rows plus caption space"
    png = encode(px, "png")
    assert decode(png).shape == (sheet.height, sheet.width, 3)


def test_contact_sheet_without_captions_and_with_non_ascii_prompts():
    assert contact_sheet([_red()], None, cols=3).size == (8 + 8, 8 + 8)
    contact_sheet([_red(28, 28)], ["ünïcödé — 数字"], cols=1)


def test_contact_sheet_rejects_caption_count_mismatch():
    with pytest.raises(ValidationError):
        contact_sheet([_red()], ["a", "b"])


def _smooth(n: int, side: int, channels: int) -> np.ndarray:
    x = np.linspace(0.0, 1.0, side)
    ramps = np.outer(x, x)[None, :, :, None] * np.arange(1, n + 1)[:, None, None, None] * 16
    return np.repeat(ramps.clip(0, 255).astype(np.uint8), channels, axis=3)


@pytest.mark.parametrize("images", [
    np.random.default_rng(0).integers(0, 256, (48, 112, 112, 1), dtype=np.uint8),
    np.random.default_rng(1).integers(0, 256, (12, 256, 256, 3), dtype=np.uint8),
    np.random.default_rng(2).integers(0, 256, (6, 64, 80, 4), dtype=np.uint8),
    _smooth(16, 112, 1), _smooth(8, 64, 3),
    np.zeros((3, 112, 112, 1), dtype=np.uint8), np.full((2, 64, 64, 3), 255, dtype=np.uint8),
], ids=["noise-grey", "noise-rgb", "noise-rgba", "ramps-grey", "ramps-rgb", "black", "white"])
def test_batch_phashes_are_the_imagehash_library_phash_of_each_image(images):
    import imagehash

    expected = [str(imagehash.phash(Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im), hash_size=8))
                for im in images]
    assert phashes(images) == expected
    assert phashes(list(images)) == expected  # the worker passes the kept images of a sub-batch as a list
    assert phashes([]) == []
    assert [phash(im) for im in images] == expected
    assert all(len(h) == 16 for h in expected)
