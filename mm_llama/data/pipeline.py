"""WebDataset pipeline for image + text shards (DESIGN §6, §9).

Stages, in order::

    shard list ─ (train) epoch-seeded shard shuffle, identical on every rank
               ─ wds.split_by_node ─ wds.split_by_worker
    or resampled shards, drawn per (seed, epoch, rank, worker)
    ─ tar shards → samples (ShardReader) ─ (train, with task_weights) task mix
    ─ (train) epoch-seeded sample shuffle buffer
    ─ decode image + text, encode_example  → {input_ids, labels, image, meta}

The pipeline is assembled from ``wds.DataPipeline`` stages rather than the
``wds.WebDataset`` convenience class because in webdataset 1.0.2 that class
cannot shuffle shards *before* the node split (so ranks would own the same
shards every epoch) and its resampler is seeded from the clock (not
reproducible). The splitters are explicit, so the 1.0.2 pitfall of the default
``single_node_only`` raising when ``world_size > 1`` cannot occur.

Corrupt samples are skipped, counted by kind in a :class:`SkipCounter` and
logged (rate-limited); they never stop a run. Missing local shards and empty URL
lists raise before the first step. Remote shards (``http(s)://``, fetched by
webdataset with ``curl -f``; ``pipe:<command>``, whose stdout is the tar) are not
probed up front: one whose stream breaks part-way is read again from where it broke
(``DataConfig.shard_retries``, :mod:`mm_llama.data.shard_reader`); one that cannot be
read (404, failing command, retries spent) is skipped and counted as ``read_error``
like an unreadable local shard, logged with its URL and the command's exit status.

Epochs: call ``dataset.set_epoch(epoch)`` before iterating (Lightning does not
do this for an ``IterableDataset``; ``mm_llama``'s data module must). The epoch
lives in shared memory, so persistent DataLoader workers see it too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import subprocess
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import Pipe
from PIL import Image
from torch.utils.data import IterableDataset

from mm_llama.data.collate import collate
from mm_llama.data.examples import (
    CAPTION_PROMPT,
    DEFAULT_MEDIA_PLACEHOLDER,
    BadExample,
    ChatTokenizer,
    ExampleTooLong,
    encode_example,
)
from mm_llama.data.image_io import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from mm_llama.data.resumable import ResumableLoader
from mm_llama.data.shard_reader import ShardReader, is_remote

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
SKIP_KINDS: dict[str, str] = {
    "read_error": "shard could not be opened or read (truncated tar, I/O error)",
    "missing_image": "sample has no png/jpg/jpeg/webp entry",
    "bad_image": "image bytes could not be decoded (empty, truncated, not an image)",
    "image_too_large": "image has more than DataConfig.max_image_pixels pixels (refused before decoding)",
    "missing_audio": "speech sample has no flac/wav entry",
    "bad_audio": "audio bytes could not be decoded (empty, corrupt flac/wav, not audio)",
    "bad_audio_values": "audio contains NaN or inf samples",
    "silent_audio": "audio is all zeros or silent (nothing to transcribe)",
    "audio_too_short": "audio shorter than the speech data's min_seconds (0.1 s by default)",
    "missing_text": "sample has neither json nor txt",
    "bad_json": "json is not valid JSON, not an object, or prompt/response is not a string",
    "bad_encoding": "json/txt is not UTF-8",
    "empty_text": "prompt or response missing or empty",
    "bad_text": "text cannot be encoded (e.g. contains the media placeholder)",
    "too_long": "encoded example longer than max_len (never truncated)",
    "missing_video": "sample has no mp4 entry, or its mp4 has no video stream",
    "bad_video": "mp4 is empty, truncated or cannot be decoded",
}

ENCODE_CACHE_SIZE = 65_536
"""Distinct (prompt, response) pairs whose encoding a decode stage keeps (per DataLoader worker);
beyond it, new pairs are encoded each time (a few MB of token ids at most)."""

ImageTransform = Callable[[Image.Image], torch.Tensor]
MediaDecoder = Callable[[dict[str, Any]], dict[str, torch.Tensor]]
"""Raw tar sample → its media tensors (e.g. ``{"video": ..., "frame_mask": ...}``); raises
:class:`CorruptSample` for unusable media."""


@dataclass
class DataConfig:
    """Where the shards are and how they are read.

    Attributes:
        train_urls: WebDataset URL(s) of the training shards: a brace pattern,
            several joined by ``::``, ``pipe:`` commands or ``http(s)://`` URLs.
        val_urls: validation shards, or ``None``.
        test_urls: test shards, or ``None``.
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: sample shuffle buffer for training (0 = no sample shuffle).
        resampled: draw training shards with replacement, forever; needs ``epoch_length``.
            The way to give every DDP rank the same number of steps (DESIGN §9).
        epoch_length: training samples per epoch over all ranks; rounded up so
            that every worker of every rank yields whole batches (see
            :func:`samples_per_worker`). ``None``: one pass over the shards.
        max_len: maximum tokens per example; longer samples are skipped and counted.
        seed: seeds shard and sample shuffling (combined with the epoch).
        image_size: side of the square image tensor.
        system_prompt: system message for every example; ``None`` keeps the
            chat template's default.
        max_image_pixels: images with more pixels (width x height) are skipped and
            counted as ``image_too_large`` from their header, never decoded.
        shard_retries: how many times a remote shard whose stream breaks part-way is opened
            again, its samples already delivered passed over (:class:`ShardReader`); 0: never.
        task_weights: training mix by the ``task`` field of a sample's json: the probability
            that a training sample of that task is kept (tasks not named: 1). The draw is
            seeded by (``seed``, epoch, sample key), so it is reproducible, the same on every
            rank, and different each epoch. Dropped samples are a sampling choice, not
            skips: :class:`SkipCounter` does not count them. ``None``: every sample.
    """

    train_urls: str
    val_urls: str | None = None
    test_urls: str | None = None
    batch_size: int = 16
    num_workers: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    epoch_length: int | None = None
    max_len: int = 128
    seed: int = 0
    image_size: int = 64
    system_prompt: str | None = None
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    task_weights: dict[str, float] | None = None
    shard_retries: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.train_urls, str) or not self.train_urls.strip():
            raise ValueError(f"DataConfig.train_urls must be a non-empty string, got {self.train_urls!r}")
        for name in ("val_urls", "test_urls"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"DataConfig.{name} must be None or a non-empty string, got {value!r}")
        if self.batch_size < 1:
            raise ValueError(f"DataConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"DataConfig.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ValueError(f"DataConfig.epoch_length must be None or >= 1, got {self.epoch_length}")
        if self.resampled and self.epoch_length is None:
            raise ValueError("DataConfig.resampled=True draws shards forever; set epoch_length (got None)")
        if self.max_len < 2:
            raise ValueError(f"DataConfig.max_len must be >= 2, got {self.max_len}")
        if self.image_size < 1:
            raise ValueError(f"DataConfig.image_size must be >= 1, got {self.image_size}")
        if self.max_image_pixels < 1:
            raise ValueError(f"DataConfig.max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.shard_retries < 0:
            raise ValueError(f"DataConfig.shard_retries must be >= 0, got {self.shard_retries}")
        if self.task_weights is not None:
            check_task_weights(self.task_weights, "DataConfig.task_weights")


def check_task_weights(weights: Any, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``weights`` maps task names to numbers in [0, 1]."""
    if not isinstance(weights, dict):
        raise ValueError(f"{name} must be a mapping task -> keep probability, got {weights!r}")
    for task, weight in weights.items():
        if not isinstance(task, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{name} must map task names to numbers, got {task!r}: {weight!r}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"{name}[{task!r}] is a keep probability in [0, 1], got {weight}")


# ---------------------------------------------------------------- shared state


class SkipCounter:
    """Counts skipped samples by kind (:data:`SKIP_KINDS`), shared across processes.

    The counts live in shared memory (``multiprocessing.Array``), so DataLoader
    workers started by fork or spawn add to the same counts the main process
    reads. Limitation: it is per machine, not per job; ranks each hold their own
    counter (all-reduce them to report a global number). Like any
    ``multiprocessing`` synchronised object it cannot be pickled except when a
    process is started (``copy.deepcopy`` of a dataset that holds it fails).

    Args:
        log_first: log every skip of a kind until it has been seen this many times...
        log_every: ...then only every ``log_every``-th.
    """

    def __init__(self, log_first: int = 10, log_every: int = 1000) -> None:
        self._kinds = list(SKIP_KINDS)
        self._counts = multiprocessing.Array("q", len(self._kinds))
        self.log_first = log_first
        self.log_every = log_every
        self._retries = multiprocessing.Value("q", 0)  # remote shards opened again after a broken stream

    def record(self, kind: str, key: str, reason: str) -> None:
        """Count one skipped sample and log it (rate-limited)."""
        i = self._kinds.index(kind)
        with self._counts.get_lock():
            self._counts[i] += 1
            n = self._counts[i]
        if n <= self.log_first or n % self.log_every == 0:
            logger.warning("skipped sample %s [%s, #%d]: %s", key, kind, n, reason)

    def handler(self, exn: Exception) -> bool:
        """Exception handler for shard-level errors (:class:`ShardReader` calls it once a shard):
        count, log, continue.

        A remote shard that cannot be fetched (``http(s)://`` through ``curl``, or a
        ``pipe:`` command that fails), or whose retries are spent, lands here, logged with
        its URL and the command's exit status: it is skipped like an unreadable local shard.
        """
        url = next((a for a in reversed(exn.args) if isinstance(a, str)), "?")  # webdataset appends it
        self.record("read_error", url, shard_error_reason(exn))
        return True

    def record_retry(self, url: str) -> None:
        """Count one remote shard opened again after its stream broke (:class:`ShardReader` logs it);
        not a skip: its samples still arrive."""
        with self._retries.get_lock():
            self._retries.value += 1

    @property
    def retries(self) -> int:
        """Remote shards opened again after a broken stream, so far."""
        return self._retries.value

    def counts(self) -> dict[str, int]:
        """Skips per kind (every kind present, zeros included)."""
        with self._counts.get_lock():
            return dict(zip(self._kinds, self._counts[:]))

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def __getitem__(self, kind: str) -> int:
        return self.counts()[kind]

    def __repr__(self) -> str:
        return f"SkipCounter({ {k: v for k, v in self.counts().items() if v} })"


_PIPE_EXIT_WAIT_S = 5.0
_CURL_HTTP_ERROR = 22  # curl -f: the server answered with an HTTP status >= 400 (e.g. 404)


def shard_error_reason(exn: Exception) -> str:
    """One line saying why a shard could not be read (the URL is logged beside it).

    For a shard streamed through a subprocess (``pipe:`` URLs, and ``http(s)://``,
    which webdataset fetches with ``curl -f``), the command's exit status is the
    useful part, not the ``Pipe`` object's repr.
    """
    message = next((a for a in exn.args if isinstance(a, str)), str(exn))
    pipe = next((a for a in exn.args if isinstance(a, Pipe)), None)
    if pipe is None:
        return f"{type(exn).__name__}: {message[:300]}"
    status = pipe.status
    if status is None:  # the stream ended (or broke); the command is exiting
        try:
            status = pipe.proc.wait(timeout=_PIPE_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            status = None
    command = pipe.proc.args if isinstance(pipe.proc.args, str) else " ".join(map(str, pipe.proc.args))
    name = command.split(maxsplit=1)[0] if command else "?"
    hint = " (HTTP error, e.g. 404 Not Found)" if name == "curl" and status == _CURL_HTTP_ERROR else ""
    exit_text = "still running" if status is None else f"exit status {status}{hint}"
    return f"{type(exn).__name__}: {name} failed ({exit_text}); command: {command[:200]}"


class SharedEpoch:
    """An epoch number in shared memory, visible to (persistent) DataLoader workers."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = multiprocessing.Value("q", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return self._value.value


class CorruptSample(Exception):
    """A sample that cannot be used; ``kind`` is a key of :data:`SKIP_KINDS`."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


# ---------------------------------------------------------------- URLs


def resolve_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand brace patterns and ``::`` lists; check that local shards exist.

    ``pipe:`` and ``scheme://`` URLs (other than ``file://``) pass unchecked.

    Raises:
        ValueError: the URLs expand to nothing.
        FileNotFoundError: a local shard does not exist (the message names it).
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = [u for p in patterns if p.strip() for u in wds.shardlists.expand_urls(p)]
    if not expanded:
        raise ValueError(f"no shard URLs in {urls!r}")
    for url in expanded:
        if is_remote(url):
            continue
        path = url.removeprefix("file://")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {url!r} not found (from {urls!r})")
    return expanded


# ---------------------------------------------------------------- stages


def _stage_rng(*parts: object) -> random.Random:
    return random.Random("/".join(map(str, parts)))  # string seeds hash with SHA-512: stable


class _EpochShardShuffle:
    """Shuffles the shard list per epoch; the same order on every rank and worker,
    so the node/worker split that follows stays a partition."""

    def __init__(self, seed: int, epoch: SharedEpoch) -> None:
        self.seed, self.epoch = seed, epoch

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        shards = list(src)
        _stage_rng("shards", self.seed, self.epoch.get()).shuffle(shards)
        yield from shards


class _ResampledShards(IterableDataset):
    """Shards drawn with replacement, forever, from a stream seeded by
    (seed, epoch, rank, worker): reproducible, and different on every rank/worker
    so no node split is needed."""

    def __init__(self, urls: list[str], seed: int, epoch: SharedEpoch) -> None:
        super().__init__()
        self.urls, self.seed, self.epoch = urls, seed, epoch

    def __iter__(self) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = _stage_rng("resample", self.seed, self.epoch.get(), rank, worker)
        while True:
            yield {"url": rng.choice(self.urls)}


class _TaskMix:
    """Keeps a raw training sample with the probability its json's ``task`` has in
    ``weights`` (1 for other tasks, samples without a task and unreadable json, which
    decoding then counts). The draw is a hash of (seed, epoch, key): reproducible and
    rank-independent, so a resumed run replays the same mix."""

    def __init__(self, weights: dict[str, float], seed: int, epoch: SharedEpoch) -> None:
        self.weights, self.seed, self.epoch = dict(weights), seed, epoch

    def keep(self, sample: dict[str, Any]) -> bool:
        try:
            task = json.loads(sample["json"]).get("task")
        except (KeyError, TypeError, ValueError, AttributeError):
            return True
        weight = self.weights.get(task, 1.0) if isinstance(task, str) else 1.0
        if weight >= 1.0:
            return True
        digest = hashlib.blake2b(f"mix/{self.seed}/{self.epoch.get()}/{sample.get('__key__')}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "little") / 2**64 < weight

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        return (sample for sample in src if self.keep(sample))


class _EpochSampleShuffle:
    """Shuffle buffer seeded by (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, seed: int, epoch: SharedEpoch) -> None:
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = _stage_rng("samples", self.seed, self.epoch.get(), rank, worker)
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


def decode_image(sample: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The sample's first image entry as an 8-bit RGB PIL image (:func:`~mm_llama.data.image_io.decode_rgb`).

    Raises:
        CorruptSample: ``missing_image``, ``bad_image`` or ``image_too_large``.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise CorruptSample("missing_image", f"entries {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        return decode_rgb(sample[ext], max_pixels)
    except ImageDecodeError as exn:
        raise CorruptSample(exn.kind, f"{ext}: {exn.reason}") from exn


def _utf8(sample: dict[str, Any], ext: str) -> str:
    try:
        return sample[ext].decode("utf-8")
    except UnicodeDecodeError as exn:
        raise CorruptSample("bad_encoding", f"{ext}: {exn}") from exn


def decode_text(sample: dict[str, Any]) -> dict[str, Any]:
    """``{"prompt", "response", ...}`` from the sample's json, else its txt caption.

    Raises:
        CorruptSample: ``missing_text``, ``bad_encoding``, ``bad_json`` or ``empty_text``.
    """
    if "json" in sample:
        try:
            meta = json.loads(_utf8(sample, "json"))
        except json.JSONDecodeError as exn:
            raise CorruptSample("bad_json", str(exn)) from exn
        if not isinstance(meta, dict):
            raise CorruptSample("bad_json", f"expected an object, got {type(meta).__name__}")
    elif "txt" in sample:
        meta = {"prompt": CAPTION_PROMPT, "response": _utf8(sample, "txt")}
    else:
        raise CorruptSample("missing_text", "no json or txt entry")
    for field in ("prompt", "response"):
        value = meta.get(field)
        if value is not None and not isinstance(value, str):
            raise CorruptSample("bad_json", f"{field!r} must be a string, got {type(value).__name__} {value!r}")
        if not value or not value.strip():
            raise CorruptSample("empty_text", f"{field}={value!r}")
        meta[field] = value.strip()
    return meta


class ResizeToTensor:
    """Default image transform: RGB PIL image → ``FloatTensor[3, size, size]`` in [0, 1].

    Bicubic resize when the size differs. Mean/std normalisation is left to the
    image encoder, which knows its own statistics.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)  # [3, H, W]


class _DecodeAndEncode:
    """Raw tar sample → ``{input_ids, labels, image, meta}`` (or the tensors of ``media``
    instead of ``image``); corrupt samples are counted."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        transform: ImageTransform,
        media_token_id: int,
        max_len: int,
        system_prompt: str | None,
        counter: SkipCounter,
        media: MediaDecoder | None = None,
        media_placeholder: str = DEFAULT_MEDIA_PLACEHOLDER,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.tokenizer, self.transform, self.media_token_id = tokenizer, transform, media_token_id
        self.max_len, self.system_prompt, self.counter = max_len, system_prompt, counter
        self.media, self.media_placeholder, self.max_pixels = media, media_placeholder, max_pixels
        self._encoded: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.media is None:
            media = {"image": self.transform(decode_image(sample, self.max_pixels))}
        else:
            media = self.media(sample)
        meta = decode_text(sample)
        encoded = self.encode(meta["prompt"], meta["response"])
        meta["__key__"] = sample["__key__"]
        meta["__url__"] = sample.get("__url__")
        return {**encoded, **media, "meta": meta}

    def encode(self, prompt: str, response: str) -> dict[str, torch.Tensor]:
        """:func:`encode_example` of one conversation, memoised: datasets repeat their texts (the
        built-in scenes' 20,000 training samples hold 2,436 distinct prompt + response pairs), and
        rendering the chat template and tokenising them again was 30 % of the loader's time
        (0.57 vs 0.40 ms a sample over 19,200 training samples, batch 64, 2-core CPU).
        Returns fresh tensors (copies of the cached ones); failures are not cached."""
        key = (prompt, response)
        encoded = self._encoded.get(key)
        if encoded is None:
            try:
                encoded = encode_example(
                    self.tokenizer,
                    prompt,
                    response,
                    media_placeholder=self.media_placeholder,
                    media_token_id=self.media_token_id,
                    system=self.system_prompt,
                    max_len=self.max_len,
                )
            except ExampleTooLong as exn:
                raise CorruptSample("too_long", str(exn)) from exn
            except BadExample as exn:
                raise CorruptSample("bad_text", str(exn)) from exn
            if len(self._encoded) < ENCODE_CACHE_SIZE:
                self._encoded[key] = encoded
        return {name: tensor.clone() for name, tensor in encoded.items()}

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                yield self.decode(sample)
            except CorruptSample as exn:
                self.counter.record(exn.kind, f"{sample.get('__url__')}:{sample.get('__key__')}", exn.reason)


# ---------------------------------------------------------------- dataset


class ShardDataset(wds.DataPipeline):
    """A ``wds.DataPipeline`` with an epoch (:meth:`set_epoch`) and a skip counter."""

    def __init__(self, *stages: Any, urls: list[str], epoch: SharedEpoch, counter: SkipCounter) -> None:
        super().__init__(*stages)
        self.urls = urls
        self.shared_epoch = epoch
        self.counter = counter

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard and sample shuffling (and resampling) for ``epoch``."""
        self.shared_epoch.set(epoch)


def samples_per_worker(cfg: DataConfig, world_size: int) -> int:
    """Training samples each DataLoader worker yields per epoch when ``epoch_length`` is set.

    ``with_epoch`` counts per worker (DESIGN §9), so ``epoch_length`` is divided
    over ``world_size * max(1, num_workers)`` workers and rounded *up* to a
    multiple of ``batch_size``: every worker of every rank then yields the same
    number of whole batches, and DDP ranks take the same number of steps.
    """
    if cfg.epoch_length is None:
        raise ValueError("samples_per_worker needs DataConfig.epoch_length")
    workers = world_size * max(1, cfg.num_workers)
    return math.ceil(cfg.epoch_length / (workers * cfg.batch_size)) * cfg.batch_size


def train_batches_per_rank(cfg: DataConfig, world_size: int) -> int:
    """Optimizer steps per epoch on each rank when ``epoch_length`` is set."""
    return max(1, cfg.num_workers) * samples_per_worker(cfg, world_size) // cfg.batch_size


def build_dataset(
    urls: str | Sequence[str],
    tokenizer: ChatTokenizer,
    transform: ImageTransform | None,
    media_token_id: int,
    *,
    train: bool,
    cfg: DataConfig,
    counter: SkipCounter | None = None,
    media: MediaDecoder | None = None,
    media_placeholder: str = DEFAULT_MEDIA_PLACEHOLDER,
    decode_stage: Callable[[Iterator[dict]], Iterator[dict]] | None = None,
) -> ShardDataset:
    """An ``IterableDataset`` of ``{input_ids [s], labels [s], image [3, H, W], meta}``.

    Args:
        urls: shard URLs (brace pattern, ``::`` list or a list of patterns).
        tokenizer: follows :class:`~mm_llama.data.examples.ChatTokenizer`.
        transform: PIL RGB image → tensor; ``None`` uses ``ResizeToTensor(cfg.image_size)``.
        media_token_id: id of ``<|image|>`` in the fusion embedding (``>= vocab_size``).
        train: shuffle shards and samples (seeded by ``cfg.seed`` and the epoch),
            resample if ``cfg.resampled``, apply ``cfg.task_weights`` and ``cfg.epoch_length``.
            Evaluation reads every shard once, in order.
        cfg: the data configuration.
        counter: where skips are counted; a new one when ``None`` (``dataset.counter``).
        media: decodes each sample's media instead of the image path (``transform`` is then
            unused), e.g. :class:`~mm_llama.data.video.VideoFrames` for
            ``{video [f, 3, H, W], frame_mask [f]}``.
        media_placeholder: the placeholder string the prompt carries (``<|video|>`` for video).
        decode_stage: replaces the image decode stage (raw samples → encoded examples), for
            other media (speech: :mod:`mm_llama.data.speech_pipeline`); it counts into ``counter``.

    Without resampling, shards are split across ranks and then workers: with
    ``world_size * num_workers`` larger than the shard count some workers idle,
    and ranks may get different sample counts; use ``resampled`` +
    ``epoch_length`` for DDP training. The world size is read when the
    dataset is built (``RANK``/``WORLD_SIZE`` or an initialised process group),
    so build it after the process group exists (a data module's ``setup``).

    Raises:
        ValueError: no URLs. FileNotFoundError: a local shard is missing.
    """
    shard_urls = resolve_urls(urls)
    counter = SkipCounter() if counter is None else counter
    epoch = SharedEpoch()
    _, world_size, _, _ = wds.utils.pytorch_worker_info()
    decode = _DecodeAndEncode(
        tokenizer,
        ResizeToTensor(cfg.image_size) if transform is None else transform,
        media_token_id,
        cfg.max_len,
        cfg.system_prompt,
        counter,
        media,
        media_placeholder,
        cfg.max_image_pixels,
    )
    stages: list[Any]
    if train and cfg.resampled:
        stages = [_ResampledShards(shard_urls, cfg.seed, epoch)]
    else:
        stages = [wds.SimpleShardList(shard_urls)]
        if train:
            stages.append(_EpochShardShuffle(cfg.seed, epoch))
        stages += [wds.split_by_node, wds.split_by_worker]
        if len(shard_urls) < world_size * max(1, cfg.num_workers):
            logger.warning(
                "%d shards for %d ranks x %d workers: some workers get no data",
                len(shard_urls), world_size, max(1, cfg.num_workers),
            )  # fmt: skip
    stages.append(ShardReader(counter.handler, retries=cfg.shard_retries, on_retry=counter.record_retry))
    if train and cfg.task_weights is not None:
        stages.append(_TaskMix(cfg.task_weights, cfg.seed, epoch))
    if train and cfg.shuffle_buffer > 0:
        stages.append(_EpochSampleShuffle(cfg.shuffle_buffer, cfg.seed, epoch))
    stages.append(decode if decode_stage is None else decode_stage)
    dataset = ShardDataset(*stages, urls=shard_urls, epoch=epoch, counter=counter)
    if train and cfg.epoch_length is not None:
        dataset = dataset.with_epoch(samples_per_worker(cfg, world_size))
    return dataset


def build_loader(dataset: IterableDataset, cfg: DataConfig, pad_id: int, pin_memory: bool = False,
                 collate_fn: Callable[..., dict[str, Any]] = collate) -> ResumableLoader:
    """A DataLoader that batches in the workers and collates with ``collate_fn`` (default :func:`collate`).

    Batching is the DataLoader's (``batch_size=cfg.batch_size``): each worker
    fills its own batches, so a worker's last batch may be partial unless
    ``epoch_length`` is set (then every batch is full). Workers are persistent
    so that a validation loop does not restart them each time; the shared epoch
    reaches them anyway. It is a :class:`~mm_llama.data.resumable.ResumableLoader`, so a
    pass can start after its first batches (mid-epoch resume).

    Starting a pass draws its workers' base seed from the loader's own generator (seeded with
    ``cfg.seed``), not from torch's global one: a new epoch, or a loader started for a scan, leaves
    the global stream (dropout, SpecAugment) as it was, so a run resumed at an epoch boundary draws
    what the run that never stopped drew. The data itself uses only its own seeded generators.
    """
    return ResumableLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=functools.partial(collate_fn, pad_id=pad_id),
        persistent_workers=cfg.num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
