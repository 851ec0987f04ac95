"""Text in, text out: a trained checkpoint answering prompts about images, videos or speech.

:class:`Assistant` rebuilds the :class:`~mm_llama.model.MultimodalLlama` of an
``adapter.ckpt`` written by ``train_adapter.py`` / ``mm-llama fit`` (the Lightning
checkpoint carries the hyper-parameters; the frozen LM is reloaded from its source
and checked against the sha256 stored in the checkpoint), turns media files into
tensors as the training pipelines do (image transform; uniformly sampled video frames;
16 kHz mono audio) and prompts into ids with the training chat encoding, and decodes
with :func:`mm_llama.generation.generate` (speech: :func:`~mm_llama.speech_generation.generate_from_speech`).
A kind of media the checkpoint has no branch for is refused with a message, never faked.

``mm-llama generate --checkpoint CKPT --image x.png|--video y.mp4|--audio z.flac "prompt"`` is :func:`main`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from encoders.preprocess import image_transform
from mm_llama.checkpoint_files import checkpoint_read_errors
from mm_llama.data.examples import encode_prompt
from mm_llama.generation import check_settings, generate
from mm_llama.data.audio_io import DecodedAudio
from mm_llama.data.video import DecodedClip
from mm_llama.inputs import InputError, check_media_kind, check_prompt, load_audio, load_image, load_video
from mm_llama.model import MultimodalLlama, without_weight_files
from mm_llama.speech_generation import generate_from_speech
from mm_llama.tokenizer import Tokenizer

ImageInput = PIL.Image.Image | str | os.PathLike
"""An image, or the path of an image file (checked by :func:`mm_llama.inputs.load_image`)."""

VideoInput = DecodedClip | str | os.PathLike
"""A decoded clip, or the path of a video file (checked by :func:`mm_llama.inputs.load_video`)."""

AudioInput = DecodedAudio | str | os.PathLike
"""A decoded clip, or the path of an audio file (checked by :func:`mm_llama.inputs.load_audio`)."""


@dataclass
class GenerationSettings:
    """Decoding settings of one request.

    Attributes:
        max_new_tokens: generation budget (>= 1).
        temperature: 0 is greedy; above 0 samples.
        top_p: nucleus mass in ``(0, 1]`` when sampling.
        seed: sampling seed; ``None`` draws from torch's global generator.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_settings(self.max_new_tokens, self.temperature, self.top_p)


class Assistant:
    """A :class:`MultimodalLlama` with its tokenizer and system prompt, answering in text.

    Args:
        model: the fused model (put in eval mode here).
        tokenizer: the frozen LM's tokenizer (chat template, stop and pad ids).
        system_prompt: system message of every prompt, as in training (``""``, the
            training default, is an empty system turn; ``None`` the template's default).
    """

    def __init__(self, model: MultimodalLlama, tokenizer: Tokenizer, system_prompt: str | None = "") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        encoder = model.cfg.image_encoder
        self.transform = image_transform(encoder.image_size, train=False) if encoder is not None else None
        self._lock = threading.Lock()  # one generation at a time: concurrent ones would only split the cores

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, lm: str | None = None, device: str = "cpu") -> Assistant:
        """Rebuild the model of an ``adapter.ckpt`` (or any AdapterModule checkpoint).

        Args:
            path: checkpoint file written by ``train_adapter.py`` or ``mm-llama fit``.
            lm: frozen LM source overriding the one recorded in the checkpoint (same weights
                at another path); its sha256 must match the checkpoint's.
            device: where to put the model.

        Raises:
            FileNotFoundError: no such checkpoint.
            CorruptCheckpointError: the file is truncated or otherwise unreadable (a ``ValueError``).
            ValueError: the checkpoint does not fit the LM or the model config.
        """
        from mm_llama.training.module import AdapterModule  # Lightning is needed only to read its checkpoints

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist (train one with train_adapter.py)")
        overrides: dict[str, object] = {"lm": lm} if lm is not None else {}
        with checkpoint_read_errors(path):
            hparams = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
        model_cfg = hparams.get("model")
        if hparams.get("init_from"):
            overrides["init_from"] = None  # the earlier stage's weights are in this checkpoint already
        if model_cfg is not None and without_weight_files(model_cfg) is not model_cfg:
            # The parts' weights are in the checkpoint itself (pre-trained, frozen parts included):
            # do not read the earlier stages' files they were built from, which may have moved.
            overrides["model"] = without_weight_files(model_cfg)
        with warnings.catch_warnings():
            # The frozen LM is deliberately absent from checkpoints; AdapterModule.on_load_checkpoint
            # checks the LM's sha256 and the exact set of trained keys instead.
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
            with checkpoint_read_errors(path):
                module = AdapterModule.load_from_checkpoint(path, map_location=device, **overrides)
        return cls(module.model.to(device), module.tokenizer, module.system_prompt)

    # --- inputs ------------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        """What this checkpoint reads besides text: ``image``, ``video``, ``speech``."""
        return self.model.modalities

    @property
    def image_size(self) -> int | None:
        """Side of the square images (and video frames) the encoder reads; ``None`` without one."""
        encoder = self.model.cfg.image_encoder
        return None if encoder is None else encoder.image_size

    def check_kind(self, kind: str) -> None:
        """:class:`InputError` unless this checkpoint reads ``kind`` (``image``, ``video``, ``audio``)."""
        check_media_kind(kind, self.modalities)

    def image_tensor(self, image: ImageInput) -> torch.Tensor:
        """An image or image file → normalised ``[3, H, W]`` (the training transform)."""
        self.check_kind("image")
        pil = image if isinstance(image, PIL.Image.Image) else load_image(image)
        return self.transform(pil)

    def video_tensor(self, video: VideoInput) -> tuple[torch.Tensor, torch.Tensor]:
        """A video file (or decoded clip) → frames ``[f, 3, H, W]`` and ``frame_mask [f]``, as in training.

        The ``f = cfg.video.frames`` frames are sampled uniformly over the clip; a clip with
        fewer frames repeats its last one, masked.
        """
        self.check_kind("video")
        frames = self.model.cfg.video.frames
        clip = video if isinstance(video, DecodedClip) else load_video(video, frames)
        tensors = [self.transform(frame) for frame in clip.frames[:frames]]  # each [3, H, W]
        mask = torch.arange(frames) < len(tensors)  # [f]
        tensors += [tensors[-1]] * (frames - len(tensors))
        return torch.stack(tensors), mask

    def audio_wave(self, audio: AudioInput) -> torch.Tensor:
        """An audio file (or decoded clip) → 16 kHz mono ``[n]`` (resampled and down-mixed as in training)."""
        self.check_kind("audio")
        return (audio if isinstance(audio, DecodedAudio) else load_audio(audio)).wave

    def prompt_ids(self, prompt: str, media: str | None = None) -> list[int]:
        """Chat-encoded prompt ending with the assistant generation prompt.

        ``media`` (``"image"``, ``"video"`` or ``"speech"``) puts its placeholder first; ``None``
        encodes text only.
        """
        placeholder = {"media_placeholder": None}
        if media is not None:
            placeholder = {"media_placeholder": f"<|{media}|>", "media_token_id": self.model.media_token_id(media)}
        return encode_prompt(self.tokenizer, check_prompt(prompt), system=self.system_prompt, **placeholder)[
            "input_ids"
        ].tolist()

    # --- generation --------------------------------------------------------------------
    def generate_ids(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageInput | None] | None = None,
        settings: GenerationSettings | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
        *,
        videos: Sequence[VideoInput | None] | None = None,
        audio: Sequence[AudioInput] | None = None,
    ) -> list[list[int]]:
        """Generated ids of each prompt (stop token excluded); see :meth:`generate`."""
        settings = settings or GenerationSettings()
        given = {kind: list(items) for kind, items in (("image", images), ("video", videos), ("audio", audio))
                 if items is not None}
        if len(given) > 1:
            raise InputError(f"give one kind of media per request, got {' and '.join(given)}")
        kind, items = next(iter(given.items()), ("text", [None] * len(prompts)))
        if len(items) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(items)} {kind} inputs")
        decode = dict(max_new_tokens=settings.max_new_tokens, stop_ids=self.tokenizer.stop_ids,
                      pad_id=self.tokenizer.pad_id, temperature=settings.temperature, top_p=settings.top_p,
                      seed=settings.seed, on_token=on_token)
        if kind == "audio":
            if any(item is None for item in items):
                raise InputError("every prompt of a speech request needs its audio (text-only prompts go separately)")
            ids = [self.prompt_ids(p, "speech") for p in prompts]
            waves = [self.audio_wave(item) for item in items]
            lengths = torch.tensor([len(w) for w in waves])
            batch = torch.zeros(len(waves), int(lengths.max()))  # [b, n]
            for row, wave in enumerate(waves):
                batch[row, : len(wave)] = wave
            with self._lock:
                return generate_from_speech(self.model, ids, batch, lengths, **decode)
        present = [item is not None for item in items]
        ids = [self.prompt_ids(p, kind if has else None) for p, has in zip(prompts, present)]
        media: dict[str, torch.Tensor] = {}
        # A prompt without media has no placeholder, so its rows never see the zeros standing in.
        if kind == "image" and any(present):
            blank = torch.zeros(3, self.image_size, self.image_size)
            media["images"] = torch.stack([self.image_tensor(x) if x is not None else blank for x in items])
        elif kind == "video" and any(present):
            blank = (torch.zeros(self.model.cfg.video.frames, 3, self.image_size, self.image_size),
                     torch.ones(self.model.cfg.video.frames, dtype=torch.bool))
            clips = [self.video_tensor(x) if x is not None else blank for x in items]
            media["videos"] = torch.stack([c[0] for c in clips])  # [b, f, 3, H, W]
            media["frame_mask"] = torch.stack([c[1] for c in clips])  # [b, f]
        with self._lock:
            return generate(self.model, ids, media.pop("images", None), **media, **decode)

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageInput | None] | None = None,
        settings: GenerationSettings | None = None,
        *,
        videos: Sequence[VideoInput | None] | None = None,
        audio: Sequence[AudioInput] | None = None,
    ) -> list[str]:
        """Answer a batch of prompts, each about its image, video or audio clip.

        Args:
            prompts: ``b`` user messages.
            images: ``b`` images / image paths / ``None`` (that prompt is text-only).
            settings: decoding settings (default: greedy, 64 new tokens).
            videos: ``b`` video paths / decoded clips / ``None``, instead of ``images``.
            audio: ``b`` audio paths / decoded clips (every prompt needs one), instead of ``images``.

        Returns:
            ``b`` answers, decoded without special tokens.

        Raises:
            InputError: an empty prompt, an unusable media file, a kind of media this
                checkpoint has no adapter for, or two kinds in one request.
        """
        out = self.generate_ids(prompts, images, settings, videos=videos, audio=audio)
        return [self.tokenizer.decode(ids) for ids in out]

    def stream(
        self,
        prompt: str,
        image: ImageInput | None = None,
        settings: GenerationSettings | None = None,
        *,
        video: VideoInput | None = None,
        audio: AudioInput | None = None,
    ) -> Iterator[str]:
        """Yield the answer to one prompt so far, after each generated token.

        Inputs are checked and media decoded before the first ``yield`` (an
        :class:`InputError` is raised at the first ``next``); generation runs in a worker
        thread feeding a queue, and stops at the next token when the consumer closes the
        iterator.
        """
        settings = settings or GenerationSettings()
        check_prompt(prompt)
        media: dict[str, list] = {}
        if image is not None:
            self.check_kind("image")
            media["images"] = [image if isinstance(image, PIL.Image.Image) else load_image(image)]
        if video is not None:
            self.check_kind("video")
            media["videos"] = [video if isinstance(video, DecodedClip) else load_video(video, self.model.cfg.video.frames)]
        if audio is not None:
            self.check_kind("audio")
            media["audio"] = [audio if isinstance(audio, DecodedAudio) else load_audio(audio)]
        if len(media) > 1:
            raise InputError(f"give one kind of media per request, got {' and '.join(media)}")
        updates: queue.Queue = queue.Queue()
        stops = set(self.tokenizer.stop_ids)
        finished, cancelled = object(), threading.Event()

        def collect(step_ids: torch.Tensor) -> None:  # step_ids [1]
            if cancelled.is_set():
                raise _Cancelled
            updates.put(int(step_ids[0]))

        def work() -> None:
            try:
                self.generate_ids([prompt], settings=settings, on_token=collect, **media)
                updates.put(finished)
            except _Cancelled:
                pass
            except BaseException as exn:  # handed to the consumer, which re-raises it
                updates.put(exn)

        threading.Thread(target=work, name="mm-llama-generate", daemon=True).start()
        ids: list[int] = []
        text = shown = ""
        try:
            while (item := updates.get()) is not finished:
                if isinstance(item, BaseException):
                    raise item
                if item in stops:
                    continue
                ids.append(item)
                text = self.tokenizer.decode(ids)
                if not text.endswith("\ufffd"):  # mid-way through a multi-byte character: wait for the rest
                    yield (shown := text)
            if text != shown:  # the answer itself ends mid-character
                yield text
        finally:
            cancelled.set()


class _Cancelled(Exception):
    """Raised inside the generation thread when the streaming consumer went away."""


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = GenerationSettings()
    p = argparse.ArgumentParser(
        prog="mm-llama generate",
        description="Answer a prompt about an image, a video or an audio clip with a trained adapter checkpoint "
                    "(no media: the frozen LM alone); streams the answer to stdout.",
    )
    p.add_argument("prompt", help="the user message, e.g. 'Describe the image.'")
    p.add_argument("--checkpoint", required=True, help="adapter checkpoint (e.g. runs/image/adapter.ckpt)")
    p.add_argument("--image", help="image file (png, jpg, webp, bmp, gif)")
    p.add_argument("--video", help="video file (mp4, mov, m4v, mkv, webm), for a checkpoint with a video branch")
    p.add_argument("--audio", help="audio file (flac, wav, ogg), for a checkpoint with a speech branch")
    p.add_argument("--lm", default=None, help="frozen LM source overriding the checkpoint's (same weights, sha256-checked)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus mass when sampling (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mm-llama generate``: print the streamed answer; exit 2 with a message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {kind: path for kind in ("image", "video", "audio") if (path := getattr(args, kind)) is not None}
    if len(given) > 1:
        parser.error(f"give one of --image, --video, --audio, not {' and '.join('--' + k for k in given)}")
    try:
        check_prompt(args.prompt)
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        image = load_image(args.image) if args.image is not None else None  # before the (slow) model load
    except ValueError as exn:  # InputError included
        parser.error(str(exn))
    try:
        assistant = Assistant.from_checkpoint(args.checkpoint, lm=args.lm)
    except (FileNotFoundError, ValueError) as exn:
        print(f"mm-llama generate: {exn}", file=sys.stderr)
        return 1
    try:
        answer = assistant.stream(args.prompt, image, settings, video=args.video, audio=args.audio)
        first = next(answer, "")  # media are checked and decoded before the first token
    except InputError as exn:
        parser.error(str(exn))
    shown = ""
    for text in itertools.chain([first] if first else [], answer):
        if text.startswith(shown):
            sys.stdout.write(text[len(shown) :])
        else:  # a detokenisation that rewrote earlier text: print the line again
            sys.stdout.write("\n" + text)
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return 0


__all__ = ["Assistant", "GenerationSettings", "InputError", "main"]
