"""What the demo page does, as plain functions: validate a request, stream an answer.

No gradio here: the page (:mod:`mm_llama.demo.app`) passes its component values in
and shows what comes back. Every user error becomes a message for the status line,
never a stack trace.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from mm_llama.data.scenes import make_sample
from mm_llama.inference import Assistant, GenerationSettings
from mm_llama.inputs import InputError, check_media_kind, check_prompt, load_image

log = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = 256
"""Largest generation budget the page offers."""

UNAVAILABLE_NOTE = (
    "Video and audio inputs are shown for completeness but are **not available yet**: "
    "no video or speech adapter is trained. Uploading one gives a message, not an answer."
)


@dataclass
class DemoRequest:
    """A validated request: the prompt, the image (or ``None`` for text only) and the settings."""

    prompt: str
    image: PIL.Image.Image | None
    settings: GenerationSettings


def parse_request(
    image: str | None,
    video: str | None,
    audio: str | None,
    prompt: str | None,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
) -> DemoRequest:
    """Check the page's values (file paths as gradio hands them over, slider numbers).

    Raises:
        InputError: a video or audio file, an unusable image, an empty prompt, or settings
            out of range; the message is meant for the user.
    """
    for kind, value in (("video", video), ("audio", audio)):
        if value:
            check_media_kind(kind)
    text = check_prompt(prompt)
    loaded = load_image(image) if image else None
    try:
        settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                      top_p=float(top_p))
    except (TypeError, ValueError) as exn:
        raise InputError(f"generation settings: {exn}") from exn
    if settings.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise InputError(f"max new tokens is {settings.max_new_tokens}; at most {MAX_NEW_TOKENS_LIMIT}")
    return DemoRequest(text, loaded, settings)


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
        request = parse_request(image, video, audio, prompt, max_new_tokens, temperature, top_p)
    except InputError as exn:
        yield "", f"⚠️ {exn}"
        return
    what = "the image" if request.image is not None else "no image (text only)"
    yield "", f"Generating with {what}…"
    start, answer = time.perf_counter(), ""
    try:
        for answer in assistant.stream(request.prompt, request.image, request.settings):
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


def write_example_images(out_dir: str | Path, n: int = 4, image_size: int = 192, seed: int = 0) -> list[list[str]]:
    """Render ``n`` test scenes of the built-in dataset as PNGs; returns ``[[path, prompt], ...]``.

    Deterministic (``make_sample`` is a function of seed, split and index); the prompts are
    the dataset's own questions, so a trained checkpoint has seen their kind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in range(n):
        sample = make_sample(seed, "test", index, image_size=image_size)
        path = out / f"scene-{index}.png"
        PIL.Image.open(io.BytesIO(sample["png"])).save(path)
        examples.append([str(path), json.loads(sample["json"])["prompt"]])
    return examples
