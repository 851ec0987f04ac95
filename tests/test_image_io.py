"""Image bytes → 8-bit RGB: odd modes are converted faithfully, broken or huge images are refused
with the skip kind the pipeline counts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mm_llama.data.image_io import ImageDecodeError, decode_rgb


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_rgb_png_round_trips_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = decode_rgb(encode(Image.fromarray(pixels)))
    assert out.mode == "RGB" and out.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(out), pixels)


def test_16_bit_greyscale_is_rescaled_not_clipped():
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    out = np.asarray(decode_rgb(encode(image))).astype(int)  # [16, 16, 3]
    expected = np.rint(ramp / 65535 * 255)
    assert np.abs(out[..., 0] - expected).max() <= 1
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    # PIL's plain convert("RGB") would saturate: more than 90 % of this ramp exceeds 255.
    assert (out[..., 0] < 255).mean() > 0.9


def test_transparency_is_composited_over_black():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)  # a colour hidden under...
    rgba[:2, :, 3] = 0  # ...fully transparent top rows
    rgba[2:, :, 3] = 255
    out = np.asarray(decode_rgb(encode(Image.fromarray(rgba, mode="RGBA"))))
    assert (out[:2] == 0).all()
    assert (out[2:] == (200, 100, 50)).all()


def test_palette_with_transparent_index_is_composited():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    out = np.asarray(decode_rgb(encode(image, transparency=0)))
    assert tuple(out[0, 0]) == (0, 0, 0)  # transparent red -> background
    assert tuple(out[3, 3]) == (0, 255, 0)


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 128, (128, 128, 128)),
    ("CMYK", (255, 0, 0, 0), (0, 255, 255)),  # pure cyan
    ("1", 1, (255, 255, 255)),
])  # fmt: skip
def test_other_modes_convert(mode, value, expected):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = np.asarray(decode_rgb(encode(Image.new(mode, (8, 8), value), fmt, **({"quality": 100} if fmt == "JPEG" else {}))))
    assert np.abs(out.astype(int) - expected).max() <= 2


@pytest.mark.parametrize("data, fragment", [
    (b"", "0 bytes"),
    (b"\x89PNG\r\n\x1a\nnot really", "Truncated"),  # a PNG signature, then garbage
    (b"random bytes that are no image at all", "UnidentifiedImageError"),
])  # fmt: skip
def test_broken_bytes_are_bad_image(data, fragment):
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(data)
    assert info.value.kind == "bad_image" and fragment in info.value.reason


def test_truncated_image_is_bad_image():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(data[: len(data) // 2])
    assert info.value.kind == "bad_image"


def test_huge_image_is_refused_from_its_header():
    data = encode(Image.new("1", (1200, 1000)))  # a few hundred bytes on disk, 1.2 M pixels
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(data, max_pixels=1_000_000)
    assert info.value.kind == "image_too_large" and "1200x1000" in info.value.reason
    assert decode_rgb(data, max_pixels=1_200_000).size == (1200, 1000)
