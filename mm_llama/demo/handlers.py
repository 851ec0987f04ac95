"""What the demo page does, as plain functions: validate a request, stream an answer.

No gradio here: the page (:mod:`mm_llama.demo.app`) passes its component values in
and shows what comes back. Every user error becomes a message for the status line,
never a stack trace.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from mm_llama.data.scenes import make_sample
from mm_llama.inference import Assistant, GenerationSettings
from mm_llama.data.audio_io import SAMPLE_RATE
from mm_llama.inputs import (MEDIA_KINDS, InputError, check_media_kind, check_prompt, load_audio, load_image,
                             load_video)

log = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = 256
"""Largest generation budget the page offers."""

KIND_ARGS: dict[str, str] = {"image": "image", "video": "video", "audio": "audio"}
"""The page's media inputs, in the order of its ``/generate`` API."""


def unavailable_note(assistant: Assistant) -> str:
    """What the page says about the media inputs this checkpoint cannot read (``""``: none)."""
    missing = [kind for kind, modality in MEDIA_KINDS.items() if modality not in assistant.modalities]
    if not missing:
        return ""
    reads = ", ".join(assistant.modalities) or "text only"
    return (f"This checkpoint reads **{reads}**: {' and '.join(missing)} input is **not available** "
            "(no adapter for it is trained in this checkpoint). Uploading one gives a message, not an answer.")


@dataclass
class DemoRequest:
    """A validated request: the prompt, at most one decoded media item and the settings.

    Attributes:
        kind: ``"image"``, ``"video"``, ``"audio"`` or ``None`` (text only).
        media: the decoded item (PIL image, :class:`~mm_llama.data.video.DecodedClip`,
            :class:`~mm_llama.data.audio_io.DecodedAudio`) or ``None``.
    """

    prompt: str
    kind: str | None
    media: object | None
    settings: GenerationSettings

    @property
    def what(self) -> str:
        """The request's media in words, for the status line."""
        return {"image": "the image", "video": "the video", "audio": "the audio"}.get(self.kind, "no media (text only)")


def parse_request(
    assistant: Assistant,
    image: str | None,
    video: str | None,
    audio: str | None,
    prompt: str | None,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
) -> DemoRequest:
    """Check the page's values (file paths as gradio hands them over, slider numbers) and decode the media.

    Raises:
        InputError: more than one media file, a kind the checkpoint has no adapter for, an
            unusable file, an empty prompt, or settings out of range; the message is meant
            for the user.
    """
    given = {kind: path for kind, path in (("image", image), ("video", video), ("audio", audio)) if path}
    if len(given) > 1:
        raise InputError(f"give one media file per question, got {' and '.join(given)}: remove all but one")
    for kind in given:
        check_media_kind(kind, assistant.modalities)
    text = check_prompt(prompt)
    try:
        settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                      top_p=float(top_p))
    except (TypeError, ValueError) as exn:
        raise InputError(f"generation settings: {exn}") from exn
    if settings.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise InputError(f"max new tokens is {settings.max_new_tokens}; at most {MAX_NEW_TOKENS_LIMIT}")
    kind, path = next(iter(given.items()), (None, None))
    loaders = {"image": load_image, "video": lambda p: load_video(p, assistant.model.cfg.video.frames),
               "audio": load_audio}
    media = loaders[kind](path) if kind else None
    return DemoRequest(text, kind, media, settings)


def respond(
    assistant: Assistant,
    image: str | None,
    video: str | None,
    audio: str | None,
    prompt: str | None,
    max_new_tokens: float = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Iterator[tuple[str, str]]:
    """Stream ``(answer so far, status)`` for one request from the page.

    Bad input yields one ``("", "⚠️ <reason>")``; an unexpected failure during generation
    is logged with its traceback and reported in one line.
    """
    try:
        request = parse_request(assistant, image, video, audio, prompt, max_new_tokens, temperature, top_p)
    except InputError as exn:
        yield "", f"⚠️ {exn}"
        return
    what = request.what
    yield "", f"Generating with {what}…"
    start, answer = time.perf_counter(), ""
    media = {KIND_ARGS[request.kind]: request.media} if request.kind else {}
    try:
        for answer in assistant.stream(request.prompt, settings=request.settings, **media):
            yield answer, f"Generating with {what}…"
    except Exception as exn:  # the page must show a message, not die; the log keeps the traceback
        log.exception("generation failed")
        yield answer, f"⚠️ generation failed: {type(exn).__name__}: {exn}"
        return
    shown = answer if answer.strip() else "(the model produced only special tokens or whitespace)"
    yield shown, f"Done in {time.perf_counter() - start:.1f} s, with {what}."


def preview(image: str | None) -> tuple[PIL.Image.Image | None, str]:
    """The uploaded image to show, or ``None`` and the reason it cannot be used."""
    if not image:
        return None, ""
    try:
        return load_image(image), ""
    except InputError as exn:
        return None, f"⚠️ {exn}"


def preview_video(assistant: Assistant, video: str | None) -> tuple[list[PIL.Image.Image], str]:
    """The frames the model would read from the uploaded video (in order), or ``[]`` and the reason."""
    if not video:
        return [], ""
    try:
        assistant.check_kind("video")
        return load_video(video, assistant.model.cfg.video.frames).frames, ""
    except InputError as exn:
        return [], f"⚠️ {exn}"


def preview_audio(assistant: Assistant, audio: str | None) -> tuple[tuple[int, np.ndarray] | None, str]:
    """The uploaded clip as the model hears it (``(16000, samples)``: resampled, mono), or ``None`` and why not."""
    if not audio:
        return None, ""
    try:
        assistant.check_kind("audio")
        decoded = load_audio(audio)
    except InputError as exn:
        return None, f"⚠️ {exn}"
    return (SAMPLE_RATE, decoded.wave.numpy()), ""


def write_examples(kind: str, out_dir: str | Path, n: int = 3, seed: int = 0, image_size: int = 192) -> list[list[str]]:
    """Write ``n`` test samples of the built-in ``kind`` dataset as files; returns ``[[path, prompt], ...]``.

    ``kind`` is ``"image"`` (shape scenes as png, ``image_size`` pixels square), ``"video"``
    (moving-shape clips as mp4) or ``"audio"`` (eSpeak NG utterances as flac). Deterministic
    (each sample is a function of seed, split and index); the prompts are the dataset's own,
    so a trained checkpoint has seen their kind.
    """
    from mm_llama.data.clips import make_clip_sample
    from mm_llama.data.spoken import make_sample as make_spoken_sample

    makers: dict[str, tuple[Callable[[int], dict], str, str]] = {
        "image": (lambda i: make_sample(seed, "test", i, image_size=image_size), "png", "scene"),
        "video": (lambda i: make_clip_sample(seed, "test", i), "mp4", "clip"),
        "audio": (lambda i: make_spoken_sample(seed, "test", i), "flac", "speech"),
    }
    if kind not in makers:
        raise ValueError(f"kind must be one of {sorted(makers)}, got {kind!r}")
    make, ext, stem = makers[kind]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in range(n):
        sample = make(index)
        path = out / f"{stem}-{index}.{ext}"
        path.write_bytes(sample[ext])
        examples.append([str(path), json.loads(sample["json"])["prompt"]])
    return examples
