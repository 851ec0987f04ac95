"""Validation of user inputs to inference (CLI, demo app): media files and prompts.

Every rejection is an :class:`InputError` whose message says what was wrong and what
is accepted, so a front end can show it as is (never a stack trace).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import PIL.Image

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
"""Image file types accepted for inference (what PIL decodes and the training data uses)."""

MAX_IMAGE_BYTES = 20 * 2**20
"""Largest accepted image file (20 MiB)."""

MAX_IMAGE_PIXELS = 40_000_000
"""Largest accepted decoded image (width x height); guards against decompression bombs."""

MAX_PROMPT_CHARS = 2000
"""Longest accepted prompt (characters)."""

MEDIA_KINDS: dict[str, str] = {"image": "image", "video": "video", "audio": "speech"}
"""Input kind offered to users → modality of the model that reads it (audio is read as speech)."""

TRAINED_MODALITIES: tuple[str, ...] = ("image",)
"""Modalities that have adapters today (video and speech are planned, see the README)."""


class InputError(ValueError):
    """A user input cannot be used; the message is meant for the user."""


def check_media_kind(kind: str) -> None:
    """Raise :class:`InputError` unless inputs of ``kind`` (``image``, ``video``, ``audio``) can be read."""
    if kind not in MEDIA_KINDS:
        raise InputError(f"unknown media kind {kind!r}; known: {', '.join(MEDIA_KINDS)}")
    modality = MEDIA_KINDS[kind]
    if modality not in TRAINED_MODALITIES:
        what = kind if kind == modality else f"{kind} ({modality})"
        raise InputError(
            f"{what} input is not available: no {modality} adapter is trained or implemented yet "
            f"(mm-llama reads {', '.join(TRAINED_MODALITIES)} only). Remove the {kind} and ask about an image."
        )


def check_prompt(prompt: str | None) -> str:
    """The prompt stripped of surrounding whitespace; :class:`InputError` if empty or too long."""
    text = (prompt or "").strip()
    if not text:
        raise InputError("the prompt is empty: type a question or instruction, e.g. 'Describe the image.'")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    return text


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open, check and fully decode an image file.

    Args:
        path: an image file with one of :data:`IMAGE_SUFFIXES`.

    Returns:
        The decoded image (any mode; :func:`encoders.preprocess.image_transform` converts to RGB).

    Raises:
        InputError: missing file, wrong type, over :data:`MAX_IMAGE_BYTES` or
            :data:`MAX_IMAGE_PIXELS`, or not decodable.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file {path.name!r} does not exist or is not a file")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(
            f"{path.name!r} is not an accepted image type; use one of {', '.join(IMAGE_SUFFIXES)}"
        )
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise InputError(f"{path.name!r} is {size / 2**20:.1f} MiB; images up to {MAX_IMAGE_BYTES // 2**20} MiB are accepted")
    if size == 0:
        raise InputError(f"{path.name!r} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as opened:
                if opened.width * opened.height > MAX_IMAGE_PIXELS:
                    raise InputError(
                        f"{path.name!r} is {opened.width}x{opened.height} pixels; at most "
                        f"{MAX_IMAGE_PIXELS:,} pixels are accepted"
                    )
                opened.load()  # decode now: a truncated file fails here, not inside the model
                image = opened.copy()
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as exn:
        raise InputError(
            f"{path.name!r} could not be read as an image: not a valid {path.suffix.lower()} file or damaged "
            f"({type(exn).__name__})"
        ) from exn
    return image
