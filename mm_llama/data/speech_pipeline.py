"""Speech samples through the shared WebDataset pipeline: decode, encode, collate.

:class:`SpeechDecodeStage` is the speech counterpart of the pipeline's image decode
stage (it plugs into :func:`~mm_llama.data.pipeline.build_dataset` as
``decode_stage``): flac/wav bytes → 16 kHz mono waveform (:mod:`mm_llama.data.audio_io`),
json → prompt/response → token ids with a ``<|speech|>`` placeholder and response-only
labels. Broken samples are skipped and counted in the pipeline's
:class:`~mm_llama.data.pipeline.SkipCounter`; clips that are usable but were cut to
``max_seconds`` are counted apart (:class:`AudioAdjustments`) and logged.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from mm_llama.data.audio_io import SAMPLE_RATE, AudioDecodeError, decode_audio
from mm_llama.data.collate import pad_text
from mm_llama.data.examples import BadExample, ChatTokenizer, ExampleTooLong, encode_example
from mm_llama.data.pipeline import CorruptSample, SkipCounter, decode_text

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = ("flac", "wav", "ogg")
SPEECH_PLACEHOLDER = "<|speech|>"


@dataclass(frozen=True)
class AudioConfig:
    """How speech clips are read.

    Attributes:
        sample_rate: rate every clip is resampled to (the front end's).
        min_seconds: shorter clips are skipped (``audio_too_short``).
        max_seconds: longer clips are truncated to this length and counted.
    """

    sample_rate: int = SAMPLE_RATE
    min_seconds: float = 0.1
    max_seconds: float = 20.0

    def __post_init__(self) -> None:
        if self.sample_rate < 1000:
            raise ValueError(f"AudioConfig.sample_rate must be >= 1000 Hz, got {self.sample_rate}")
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"AudioConfig needs 0 <= min_seconds < max_seconds, got "
                             f"{self.min_seconds}, {self.max_seconds}")


class AudioAdjustments:
    """Counts of usable clips that were changed (shared across DataLoader workers).

    ``truncated``: cut to ``max_seconds``; ``resampled``: not at the target rate;
    ``downmixed``: more than one channel.
    """

    KINDS = ("truncated", "resampled", "downmixed")

    def __init__(self, log_first: int = 5) -> None:
        self._counts = multiprocessing.Array("q", len(self.KINDS))
        self.log_first = log_first

    def record(self, kind: str, key: str, detail: str) -> None:
        i = self.KINDS.index(kind)
        with self._counts.get_lock():
            self._counts[i] += 1
            n = self._counts[i]
        if kind == "truncated" and n <= self.log_first:
            logger.warning("truncated audio of %s (#%d): %s", key, n, detail)

    def counts(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(self.KINDS, self._counts[:]))


def audio_bytes(sample: dict[str, Any]) -> bytes:
    """The sample's audio entry; ``CorruptSample("missing_audio")`` when it has none."""
    for ext in AUDIO_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise CorruptSample("missing_audio", f"no {'/'.join(AUDIO_EXTENSIONS)} entry (keys: {sorted(sample)})")


class SpeechDecodeStage:
    """Raw tar samples → ``{input_ids [s], labels [s], audio [n], meta}``; broken ones counted."""

    def __init__(self, tokenizer: ChatTokenizer, media_token_id: int, max_len: int, system_prompt: str | None,
                 counter: SkipCounter, audio: AudioConfig = AudioConfig(),
                 adjustments: AudioAdjustments | None = None) -> None:
        self.tokenizer, self.media_token_id, self.max_len = tokenizer, media_token_id, max_len
        self.system_prompt, self.counter, self.audio = system_prompt, counter, audio
        self.adjustments = adjustments or AudioAdjustments()

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        key = f"{sample.get('__url__')}:{sample.get('__key__')}"
        try:
            clip = decode_audio(audio_bytes(sample), sample_rate=self.audio.sample_rate,
                                min_seconds=self.audio.min_seconds, max_seconds=self.audio.max_seconds)
        except AudioDecodeError as exn:
            raise CorruptSample(exn.kind, exn.reason) from exn
        meta = decode_text(sample)
        try:
            encoded = encode_example(self.tokenizer, meta["prompt"], meta["response"],
                                     media_placeholder=SPEECH_PLACEHOLDER, media_token_id=self.media_token_id,
                                     system=self.system_prompt, max_len=self.max_len)
        except ExampleTooLong as exn:
            raise CorruptSample("too_long", str(exn)) from exn
        except BadExample as exn:
            raise CorruptSample("bad_text", str(exn)) from exn
        if clip.truncated:
            self.adjustments.record("truncated", key, f"longer than {self.audio.max_seconds} s")
        if clip.source_rate != self.audio.sample_rate:
            self.adjustments.record("resampled", key, f"{clip.source_rate} Hz")
        if clip.channels > 1:
            self.adjustments.record("downmixed", key, f"{clip.channels} channels")
        meta["__key__"] = sample["__key__"]
        meta["__url__"] = sample.get("__url__")
        return {**encoded, "audio": clip.wave, "meta": meta}

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                yield self.decode(sample)
            except CorruptSample as exn:
                self.counter.record(exn.kind, f"{sample.get('__url__')}:{sample.get('__key__')}", exn.reason)


def pad_audio(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[n_i]`` waveforms with zeros → ``audio [b, n]`` and ``audio_lengths [b]``."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    audio = torch.zeros(len(waves), int(lengths.max()))  # [b, n]
    for i, w in enumerate(waves):
        audio[i, : len(w)] = w
    return audio, lengths


def collate_speech(batch: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Collate :class:`SpeechDecodeStage` samples.

    Returns:
        ``input_ids [b, s]``, ``labels [b, s]``, ``attention_mask [b, s]`` (text, right-padded),
        ``audio [b, n]`` (zero-padded 16 kHz waveforms), ``audio_lengths [b]`` and ``meta``.
    """
    out: dict[str, Any] = pad_text(batch, pad_id)
    out["audio"], out["audio_lengths"] = pad_audio([x["audio"] for x in batch])
    out["meta"] = [x["meta"] for x in batch]
    return out
