"""Validation of user inputs to inference (CLI, demo app): media files and prompts.

Every rejection is an :class:`InputError` whose message says what was wrong and what
is accepted, so a front end can show it as is (never a stack trace).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import PIL.Image

if TYPE_CHECKING:  # the decoders pull in PyAV / soundfile: imported when a file is read
    from mm_llama.data.audio_io import DecodedAudio
    from mm_llama.data.video import DecodedClip

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
"""Image file types accepted for inference (what PIL decodes and the training data uses)."""

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".mov", ".m4v", ".mkv", ".webm")
"""Video file types accepted for inference (containers FFmpeg demuxes through PyAV)."""

AUDIO_SUFFIXES: tuple[str, ...] = (".flac", ".wav", ".ogg")
"""Audio file types accepted for inference (what libsndfile reads; the shards hold flac)."""

MAX_IMAGE_BYTES = 20 * 2**20
"""Largest accepted image file (20 MiB)."""

MAX_VIDEO_BYTES = 100 * 2**20
"""Largest accepted video file (100 MiB; only the sampled frames are decoded)."""

MAX_AUDIO_BYTES = 50 * 2**20
"""Largest accepted audio file (50 MiB)."""

MAX_AUDIO_SECONDS = 30.0
"""Longest accepted speech clip; a longer one is refused, not silently cut."""

MAX_IMAGE_PIXELS = 40_000_000
"""Largest accepted decoded image (width x height); guards against decompression bombs."""

MAX_PROMPT_CHARS = 2000
"""Longest accepted prompt (characters)."""

MEDIA_KINDS: dict[str, str] = {"image": "image", "video": "video", "audio": "speech"}
"""Input kind offered to users → modality of the model that reads it (audio is read as speech)."""


class InputError(ValueError):
    """A user input cannot be used; the message is meant for the user."""


def check_media_kind(kind: str, available: Sequence[str]) -> None:
    """Raise :class:`InputError` unless inputs of ``kind`` (``image``, ``video``, ``audio``) can be read.

    Args:
        kind: the input's kind, as offered to users.
        available: the modalities the loaded checkpoint has adapters for
            (:attr:`~mm_llama.model.MultimodalLlama.modalities`).
    """
    if kind not in MEDIA_KINDS:
        raise InputError(f"unknown media kind {kind!r}; known: {', '.join(MEDIA_KINDS)}")
    modality = MEDIA_KINDS[kind]
    if modality not in available:
        what = kind if kind == modality else f"{kind} ({modality})"
        reads = ", ".join(available) if available else "text only"
        raise InputError(
            f"{what} input is not available: this checkpoint has no {modality} adapter (it reads {reads}). "
            f"Remove the {kind}, or load a checkpoint trained with train_adapter.py --modality {modality}."
        )


def check_prompt(prompt: str | None) -> str:
    """The prompt stripped of surrounding whitespace; :class:`InputError` if empty or too long."""
    text = (prompt or "").strip()
    if not text:
        raise InputError("the prompt is empty: type a question or instruction, e.g. 'Describe the image.'")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    return text


def _check_file(path: str | os.PathLike, kind: str, suffixes: Sequence[str], max_bytes: int) -> Path:
    """``path`` if it is a non-empty file of an accepted type and size, else :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{kind} file {path.name!r} does not exist or is not a file")
    if path.suffix.lower() not in suffixes:
        raise InputError(f"{path.name!r} is not an accepted {kind} type; use one of {', '.join(suffixes)}")
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"{path.name!r} is {size / 2**20:.1f} MiB; {kind}s up to {max_bytes // 2**20} MiB are accepted")
    if size == 0:
        raise InputError(f"{path.name!r} is empty (0 bytes)")
    return path


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
    path = _check_file(path, "image", IMAGE_SUFFIXES, MAX_IMAGE_BYTES)
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


def load_video(path: str | os.PathLike, n_frames: int) -> DecodedClip:
    """Check a video file and decode its ``n_frames`` uniformly sampled frames (as in training).

    Raises:
        InputError: missing file, wrong type, over :data:`MAX_VIDEO_BYTES`, no video
            stream, or not decodable (truncated, not a video).
    """
    from mm_llama.data.pipeline import CorruptSample
    from mm_llama.data.video import decode_clip

    path = _check_file(path, "video", VIDEO_SUFFIXES, MAX_VIDEO_BYTES)
    try:
        return decode_clip(path.read_bytes(), n_frames)
    except CorruptSample as exn:
        what = "has no video stream" if exn.kind == "missing_video" else "could not be decoded as a video"
        raise InputError(f"{path.name!r} {what} ({exn.reason})") from exn


def load_audio(path: str | os.PathLike, max_seconds: float = MAX_AUDIO_SECONDS) -> DecodedAudio:
    """Check an audio file and decode it to 16 kHz mono (resampled and down-mixed as in training).

    Raises:
        InputError: missing file, wrong type, over :data:`MAX_AUDIO_BYTES`, not decodable,
            NaN/inf samples, silent, shorter than 0.1 s or longer than ``max_seconds``.
    """
    from mm_llama.data.audio_io import AudioDecodeError, decode_audio

    path = _check_file(path, "audio", AUDIO_SUFFIXES, MAX_AUDIO_BYTES)
    reasons = {
        "bad_audio": "could not be decoded as audio",
        "bad_audio_values": "holds NaN or infinite samples",
        "silent_audio": "is silent",
        "audio_too_short": "is too short",
    }
    try:
        decoded = decode_audio(path.read_bytes(), max_seconds=max_seconds)
    except AudioDecodeError as exn:
        raise InputError(f"{path.name!r} {reasons.get(exn.kind, exn.kind)} ({exn.reason})") from exn
    if decoded.truncated:
        raise InputError(f"{path.name!r} is longer than {max_seconds:g} s; cut it to a shorter clip")
    return decoded
