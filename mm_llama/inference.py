"""Text in, text out: a trained checkpoint answering prompts about images.

:class:`Assistant` rebuilds the :class:`~mm_llama.model.MultimodalLlama` of an
``adapter.ckpt`` written by ``train_adapter.py`` / ``mm-llama fit`` (the Lightning
checkpoint carries the hyper-parameters; the frozen LM is reloaded from its source
and checked against the sha256 stored in the checkpoint), turns image files into
tensors with the training transform and prompts into ids with the training chat
encoding, and decodes with :func:`mm_llama.generation.generate`.

``mm-llama generate --checkpoint CKPT --image x.png "prompt"`` is :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from mm_llama.inputs import InputError, check_media_kind, check_prompt, load_image
from mm_llama.model import MultimodalLlama
from mm_llama.tokenizer import Tokenizer

ImageInput = PIL.Image.Image | str | os.PathLike
"""An image, or the path of an image file (checked by :func:`mm_llama.inputs.load_image`)."""


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
        self.transform = image_transform(model.cfg.image_encoder.image_size, train=False)
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
        if getattr(getattr(model_cfg, "image_encoder", None), "checkpoint", None) is not None:
            # The encoder's weights are in the checkpoint itself (a pre-trained, frozen encoder
            # included): do not read the stage-1 file it was built from, which may have moved.
            encoder_cfg = dataclasses.replace(model_cfg.image_encoder, checkpoint=None)
            overrides["model"] = dataclasses.replace(model_cfg, image_encoder=encoder_cfg)
        with warnings.catch_warnings():
            # The frozen LM is deliberately absent from checkpoints; AdapterModule.on_load_checkpoint
            # checks the LM's sha256 and the exact set of trained keys instead.
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
            with checkpoint_read_errors(path):
                module = AdapterModule.load_from_checkpoint(path, map_location=device, **overrides)
        return cls(module.model.to(device), module.tokenizer, module.system_prompt)

    # --- inputs ------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Side of the square images the encoder reads."""
        return self.model.cfg.image_encoder.image_size

    def image_tensor(self, image: ImageInput) -> torch.Tensor:
        """An image or image file → normalised ``[3, H, W]`` (the training transform)."""
        pil = image if isinstance(image, PIL.Image.Image) else load_image(image)
        return self.transform(pil)

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        """Chat-encoded prompt ending with the assistant generation prompt (``<|image|>`` first if ``with_image``)."""
        media = {"media_token_id": self.model.media_token_id("image")} if with_image else {"media_placeholder": None}
        return encode_prompt(self.tokenizer, check_prompt(prompt), system=self.system_prompt, **media)[
            "input_ids"
        ].tolist()

    # --- generation --------------------------------------------------------------------
    def generate_ids(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageInput | None] | None = None,
        settings: GenerationSettings | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> list[list[int]]:
        """Generated ids of each prompt (stop token excluded); see :meth:`generate`."""
        settings = settings or GenerationSettings()
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        ids = [self.prompt_ids(p, image is not None) for p, image in zip(prompts, images)]
        pixels = None
        if any(image is not None for image in images):
            # A prompt without an image has no placeholder, so its rows never see the zero image.
            blank = torch.zeros(3, self.image_size, self.image_size)
            pixels = torch.stack([blank if im is None else self.image_tensor(im) for im in images])  # [b, 3, H, W]
        with self._lock:
            return generate(
                self.model, ids, pixels, max_new_tokens=settings.max_new_tokens,
                stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id,
                temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed, on_token=on_token,
            )  # fmt: skip

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageInput | None] | None = None,
        settings: GenerationSettings | None = None,
    ) -> list[str]:
        """Answer a batch of prompts, each about its image (or text-only where the image is ``None``).

        Args:
            prompts: ``b`` user messages.
            images: ``b`` images / image paths / ``None``; ``None`` for all text-only.
            settings: decoding settings (default: greedy, 64 new tokens).

        Returns:
            ``b`` answers, decoded without special tokens.

        Raises:
            InputError: an empty prompt or an unusable image file.
        """
        return [self.tokenizer.decode(ids) for ids in self.generate_ids(prompts, images, settings)]

    def stream(
        self, prompt: str, image: ImageInput | None = None, settings: GenerationSettings | None = None
    ) -> Iterator[str]:
        """Yield the answer to one prompt so far, after each generated token.

        Inputs are checked before the first ``yield`` (an :class:`InputError` is raised
        at the first ``next``); generation runs in a worker thread feeding a queue, and
        stops at the next token when the consumer closes the iterator.
        """
        settings = settings or GenerationSettings()
        pil = load_image(image) if image is not None and not isinstance(image, PIL.Image.Image) else image
        check_prompt(prompt)
        updates: queue.Queue = queue.Queue()
        stops = set(self.tokenizer.stop_ids)
        finished, cancelled = object(), threading.Event()

        def collect(step_ids: torch.Tensor) -> None:  # step_ids [1]
            if cancelled.is_set():
                raise _Cancelled
            updates.put(int(step_ids[0]))

        def work() -> None:
            try:
                self.generate_ids([prompt], [pil], settings, on_token=collect)
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
        description="Answer a prompt about an image with a trained adapter checkpoint; streams the answer to stdout.",
    )
    p.add_argument("prompt", help="the user message, e.g. 'Describe the image.'")
    p.add_argument("--checkpoint", required=True, help="adapter checkpoint (e.g. runs/image/adapter.ckpt)")
    p.add_argument("--image", help="image file (png, jpg, webp, bmp, gif); omitted: text-only")
    p.add_argument("--video", help="video file: not available yet (no video adapter is trained)")
    p.add_argument("--audio", help="audio file: not available yet (no speech adapter is trained)")
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
    try:
        for kind in ("video", "audio"):
            if getattr(args, kind) is not None:
                check_media_kind(kind)
        check_prompt(args.prompt)
        image = load_image(args.image) if args.image is not None else None
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except ValueError as exn:  # InputError included
        parser.error(str(exn))
    try:
        assistant = Assistant.from_checkpoint(args.checkpoint, lm=args.lm)
    except (FileNotFoundError, ValueError) as exn:
        print(f"mm-llama generate: {exn}", file=sys.stderr)
        return 1
    shown = ""
    for text in assistant.stream(args.prompt, image, settings):
        if text.startswith(shown):
            sys.stdout.write(text[len(shown) :])
        else:  # a detokenisation that rewrote earlier text: print the line again
            sys.stdout.write("\n" + text)
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return 0


__all__ = ["Assistant", "GenerationSettings", "InputError", "main"]
