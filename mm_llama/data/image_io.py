"""Image bytes from a shard → an 8-bit RGB PIL image, or a reason why not.

Decoding is where real-world image data goes wrong, so every path is explicit:

* the header is read first and an image larger than ``max_pixels`` is refused
  *before* its pixels are decoded (a 20000 x 20000 PNG is 400 KB on disk and
  1.2 GB decoded);
* 16-bit and 32-bit integer greyscale (``I;16``, ``I``) is rescaled to 8 bits
  rather than clipped at 255 (PIL's plain ``convert("RGB")`` would turn most of a
  16-bit image white);
* transparency (``RGBA``, ``LA``, palette with a transparent colour) is composited
  over black, the background of the built-in scenes, instead of exposing whatever
  colour the transparent pixels happen to store;
* everything else (``L``, ``P``, ``CMYK``, ``YCbCr``, ``1``) goes through PIL's own
  conversion.
"""

from __future__ import annotations

import warnings
from io import BytesIO

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest image (width x height) decoded by default: a 4096 x 4096 RGB image is 48 MiB."""


class ImageDecodeError(ValueError):
    """Image bytes that cannot become an RGB image; ``kind`` is a skip kind of the pipeline."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` (PNG, JPEG, WebP, ... as PIL sniffs it) into an 8-bit RGB image.

    Raises:
        ImageDecodeError: ``image_too_large`` (more than ``max_pixels`` pixels, found from
            the header alone) or ``bad_image`` (empty, truncated or undecodable bytes).
    """
    if not data:
        raise ImageDecodeError("bad_image", "0 bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) or raises for huge images; we decide by max_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        "image_too_large", f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}"
                    )
                image.load()  # the full decode: truncated data fails here
                return to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exn:  # past PIL's own hard limit, before we could read the size
        raise ImageDecodeError("image_too_large", str(exn)) from exn
    except Exception as exn:  # PIL raises many types on corrupt bytes; all mean "bad image"
        raise ImageDecodeError("bad_image", f"{type(exn).__name__}: {exn}") from exn


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB (see the module docstring for the rules)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode.startswith("I"):  # 16- or 32-bit integer greyscale
        array = np.asarray(image).astype(np.float64)  # [H, W]
        peak = array.max(initial=0)
        full_scale = 65535.0 if image.mode.startswith("I;16") or 255 < peak <= 65535 else 255.0
        if peak > 65535:
            full_scale = float(np.iinfo(np.int32).max)
        grey = np.clip(np.rint(array / full_scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ImageDecodeError("bad_image", "floating-point image with NaN or inf pixels")
        grey = np.clip(np.rint(array * 255.0 if array.max(initial=0) <= 1.0 else array), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")
