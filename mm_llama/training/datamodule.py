"""Lightning data module over image + text WebDataset shards (DESIGN §6, §7, §9).

The tokenizer, the ``<|image|>`` id, the encoder's input size and the system
prompt belong to the model, not to the data: :meth:`ImageDataModule.setup`
reads them from the trainer's LightningModule (or from whatever was passed to
:meth:`ImageDataModule.connect`), so a config never states them twice.

Lightning does not tell an ``IterableDataset`` which epoch it is in (it only
calls ``sampler.set_epoch``), so the module adds a small callback to the
trainer that sets the shared epoch of the training shards before each epoch
and logs the skipped-sample counts after each epoch.

Mid-epoch resume: the same callback counts the training batches consumed in the
current epoch and stores ``(epoch, batches)`` in every checkpoint. Restoring it
(Lightning restores callbacks before it asks for the training loader) makes the
next training loader start at that epoch, after those batches: the data order of
a resumed run is the uninterrupted run's, batch for batch (tested).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from encoders.preprocess import image_transform
from mm_llama.data.examples import ChatTokenizer
from mm_llama.data.image_io import DEFAULT_MAX_PIXELS
from mm_llama.data.pipeline import DataConfig, ShardDataset, SkipCounter, build_dataset, build_loader
from mm_llama.data.resumable import ResumableLoader
from mm_llama.data import clips
from mm_llama.data.scenes import GENERATOR_VERSION, MANIFEST, SPLITS, brace_url, make_default_shards
from mm_llama.data.video import VideoFrames

log = logging.getLogger(__name__)

_STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


@dataclass(frozen=True)
class ModelInputs:
    """What the data needs to know about the model it feeds.

    Attributes:
        tokenizer: the frozen LM's tokenizer (:class:`~mm_llama.data.examples.ChatTokenizer`).
        media_token_id: id of ``<|image|>`` in the fusion embedding.
        image_size: side of the square image the encoder takes.
        system_prompt: system message the model is evaluated with (``None``: template default).
        frames: frames the video branch samples per clip (``None``: the model reads no video).
    """

    tokenizer: ChatTokenizer
    media_token_id: int
    image_size: int
    system_prompt: str | None
    frames: int | None = None


class _AdapterModuleLike(Protocol):
    tokenizer: ChatTokenizer
    system_prompt: str | None
    model: Any  # MultimodalLlama: media_token_id(), cfg.image_encoder.image_size


def model_inputs(module: _AdapterModuleLike, modality: str = "image") -> ModelInputs:
    """:class:`ModelInputs` of an :class:`~mm_llama.training.module.AdapterModule` for ``modality``
    (``image`` or ``video``), or the ``inputs`` a module carries itself (the encoder pre-training
    stage, which has no LM)."""
    if isinstance(getattr(module, "inputs", None), ModelInputs):
        return module.inputs
    video = getattr(module.model.cfg, "video", None)
    return ModelInputs(
        tokenizer=module.tokenizer,
        media_token_id=module.model.media_token_id(modality),
        image_size=module.model.cfg.image_encoder.image_size,
        system_prompt=module.system_prompt,
        frames=video.frames if video is not None else None,
    )


def manifest_splits(data_dir: str | Path) -> dict[str, dict[str, Any]] | None:
    """The per-split entries (``n_shards``, ``samples_per_shard``, ``n_samples``) of the built-in
    shards' ``manifest.json`` under ``data_dir``; ``None`` when there is none."""
    manifest_path = Path(data_dir) / MANIFEST
    return json.loads(manifest_path.read_text())["splits"] if manifest_path.is_file() else None


def default_shard_urls(data_dir: str | Path) -> dict[str, str]:
    """Brace URLs of the built-in shards under ``data_dir``, read from its ``manifest.json``.

    Raises:
        FileNotFoundError: no manifest (the shards were never generated, or generation
            was interrupted).
    """
    splits = manifest_splits(data_dir)
    if splits is None:
        raise FileNotFoundError(
            f"{Path(data_dir) / MANIFEST} not found: generate the shards with `mm-llama make-shards --out {data_dir}` "
            "(the data module's prepare_data does it when no URLs are given)"
        )
    return {split: brace_url(data_dir, split, splits[split]["n_shards"]) for split in SPLITS}


_GENERATORS: dict[str, tuple[str, int]] = {
    "image": ("mm_llama.data.scenes", GENERATOR_VERSION),
    "video": ("mm_llama.data.clips", clips.GENERATOR_VERSION),
}
"""Built-in shard generator (manifest ``generator`` field) and version of each modality."""


def ensure_default_shards(data_dir: str | Path, progress: bool = True, modality: str = "image") -> dict[str, str]:
    """Generate the built-in shards of ``modality`` (shape scenes or clips) under ``data_dir``
    unless a complete set is there.

    A set written by ``mm-llama make-shards`` with other sizes is kept as it is; only a
    missing manifest (nothing there, or an interrupted run) or one from another
    generator version triggers (re)generation with the default sizes.

    Raises:
        ValueError: ``data_dir`` holds the other modality's shards.
    """
    generator, version = _GENERATORS[modality]
    manifest_path = Path(data_dir) / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        found = manifest.get("generator", "mm_llama.data.scenes")
        if found != generator:
            raise ValueError(f"{data_dir} holds {found} shards, not the {modality} ones ({generator}); "
                             f"choose another data_dir for {modality}")
        if manifest.get("version") == version:
            return default_shard_urls(data_dir)
    log.info("writing the built-in %s shards to %s", modality, data_dir)
    if modality == "video":
        return clips.make_default_clip_shards(data_dir, progress=progress)
    return make_default_shards(data_dir, progress=progress)


class ImageDataModule(L.LightningDataModule):
    """Image (or video) + text WebDataset shards for :class:`~mm_llama.training.module.AdapterModule`.

    Args:
        data_dir: where the built-in shards live (shape scenes, or clips for video); used for
            every split whose URLs are ``None`` (generated by :meth:`prepare_data` when missing).
        train_urls: training shards (brace pattern, ``::`` list, ``pipe:`` or URLs), or
            ``None`` for the built-in ones.
        val_urls: validation shards, or ``None`` for the built-in ones.
        test_urls: test shards, or ``None`` for the built-in ones (also used by ``predict``).
        batch_size: training samples per batch and rank.
        eval_batch_size: validation / test / predict samples per batch and rank; ``None``: ``batch_size``.
            Evaluation generates answers without gradients, so a larger batch is cheaper per sample.
        num_workers: DataLoader worker processes per rank and split.
        image_size: side of the encoder's input; ``None`` takes the model's. When given,
            it must equal the model's (it is checked).
        resampled: draw training shards with replacement (needs ``epoch_length``); the
            way to give every DDP rank the same number of steps.
        epoch_length: training samples per epoch over all ranks; ``None`` = one pass.
        shuffle_buffer: training sample shuffle buffer.
        max_len: longest example in tokens; longer ones are skipped and counted.
        seed: seeds shard and sample shuffling (with the epoch).
        system_prompt: system message of every example; must equal the model's (``mm-llama``
            links the two; ``""`` = an empty system turn, ``None`` = the chat template's default).
        val_samples: at most this many validation samples per evaluation (the same,
            first ones each time), to keep validation with generation cheap; ``None`` = all.
        test_samples: the same cap for test / predict; ``None`` = the whole split.
        max_image_pixels: larger images (width x height, read from the header) are skipped
            and counted as ``image_too_large`` without being decoded.
        modality: ``"image"`` (``png``/``jpg`` samples) or ``"video"`` (``mp4`` samples, decoded to
            the model's ``video.frames`` uniformly sampled frames, prompts with ``<|video|>``).
        progress: show a progress bar while :meth:`prepare_data` writes the built-in shards.
        task_weights: the training mix: the probability that a training sample whose json
            ``task`` is named is kept (others: 1), e.g. ``{"count": 0.25}``; validation and test
            read every sample. ``None``: all (:attr:`DataConfig.task_weights`).
        shard_retries: how many times a remote shard (``http(s)://``, ``pipe:``) whose stream
            breaks part-way is read again from where it broke (:attr:`DataConfig.shard_retries`).
    """

    def __init__(
        self,
        data_dir: str = "data/shapes",
        train_urls: str | None = None,
        val_urls: str | None = None,
        test_urls: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int | None = None,
        resampled: bool = False,
        epoch_length: int | None = None,
        shuffle_buffer: int = 1000,
        max_len: int = 128,
        seed: int = 0,
        system_prompt: str | None = "",
        val_samples: int | None = 128,
        test_samples: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        modality: str = "image",
        progress: bool = True,
        task_weights: dict[str, float] | None = None,
        shard_retries: int = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if modality not in _GENERATORS:
            raise ValueError(f"ImageDataModule.modality must be one of {sorted(_GENERATORS)}, got {modality!r}")
        self.modality = modality
        self.data_dir = data_dir
        self.urls: dict[str, str | None] = {"train": train_urls, "val": val_urls, "test": test_urls}
        for name, cap in (("val_samples", val_samples), ("test_samples", test_samples),
                          ("eval_batch_size", eval_batch_size)):
            if cap is not None and cap < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be None or >= 1, got {cap}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"ImageDataModule.image_size must be None or >= 1, got {image_size}")
        self.image_size = image_size
        self.caps = {"train": None, "val": val_samples, "test": test_samples}
        # Validate the rest now (DataConfig raises naming the bad value), not at the first step.
        self._config(train_urls or "<built-in>", image_size or 1, system_prompt)
        self.counters = {split: SkipCounter() for split in SPLITS}
        self.inputs: ModelInputs | None = None
        self.datasets: dict[str, ShardDataset] = {}
        self._epoch_hooks = _DataEpochHooks(self)
        self._resume_at: TrainPosition | None = None

    def _config(self, train_urls: str, image_size: int, system_prompt: str | None) -> DataConfig:
        hp = self.hparams
        return DataConfig(
            train_urls=train_urls,
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            shuffle_buffer=hp.shuffle_buffer,
            resampled=hp.resampled,
            epoch_length=hp.epoch_length,
            max_len=hp.max_len,
            seed=hp.seed,
            image_size=image_size,
            system_prompt=system_prompt,
            max_image_pixels=hp.max_image_pixels,
            task_weights=hp.task_weights,
            shard_retries=hp.shard_retries,
        )

    # --- wiring to the model ----------------------------------------------------------
    def connect(self, inputs: ModelInputs) -> None:
        """Use ``inputs`` (tokenizer, media id, image size, system prompt) for the datasets.

        Raises:
            ValueError: ``image_size`` or ``system_prompt`` of this module contradicts the model's.
        """
        if self.image_size is not None and self.image_size != inputs.image_size:
            raise ValueError(
                f"ImageDataModule.image_size={self.image_size} but the model's image encoder takes "
                f"{inputs.image_size}x{inputs.image_size} images; leave data.image_size unset to follow the model"
            )
        if self.modality == "video" and inputs.frames is None:
            raise ValueError("data.modality is 'video' but the model has no video branch (set model.model.video)")
        if self.hparams.system_prompt != inputs.system_prompt:
            raise ValueError(
                f"ImageDataModule.system_prompt={self.hparams.system_prompt!r} but the model's is "
                f"{inputs.system_prompt!r}: training and evaluation prompts would differ"
            )
        if self.inputs is not None and self.inputs != inputs:
            self.datasets.clear()  # built for another model
        self.inputs = inputs

    def model_inputs(self, module: _AdapterModuleLike) -> ModelInputs:
        """What this data module reads from ``module`` (the media placeholder, image size, frames)."""
        return model_inputs(module, self.modality)

    @property
    def config(self) -> DataConfig:
        """The resolved :class:`DataConfig` (after :meth:`connect`)."""
        if self.inputs is None:
            raise RuntimeError("ImageDataModule is not connected to a model yet (setup() or connect())")
        return self._config(self.split_urls("train"), self.inputs.image_size, self.inputs.system_prompt)

    def split_urls(self, split: str) -> str:
        """Shard URLs of ``split``: the given ones, else the built-in shards under ``data_dir``."""
        return self.urls[split] or default_shard_urls(self.data_dir)[split]

    # --- Lightning hooks ----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the built-in shards (once per machine) for every split given no URLs."""
        if any(u is None for u in self.urls.values()):
            ensure_default_shards(self.data_dir, progress=self.hparams.progress, modality=self.modality)

    def setup(self, stage: str) -> None:
        """Build the datasets ``stage`` needs (``fit``: train + val; ``test``/``predict``: test)."""
        trainer = self.trainer
        if trainer is not None:
            self.connect(self.model_inputs(trainer.lightning_module))  # the trainer's model wins
            if self._epoch_hooks not in trainer.callbacks:
                trainer.callbacks.append(self._epoch_hooks)
        if self.inputs is None:
            raise RuntimeError("ImageDataModule.setup() needs a trainer or a prior connect(model_inputs)")
        for split in _STAGE_SPLITS[stage]:
            if split not in self.datasets:
                self.datasets[split] = self._build(split)

    def _build(self, split: str) -> ShardDataset:
        assert self.inputs is not None
        cfg, train = self.config, split == "train"
        transform = image_transform(cfg.image_size, train=train)
        video = {}
        if self.modality == "video":  # frames are resized and normalised exactly as images are
            video = {"media": VideoFrames(self.inputs.frames, transform), "media_placeholder": clips.VIDEO_PLACEHOLDER}
        dataset = build_dataset(
            self.split_urls(split),
            self.inputs.tokenizer,
            transform,
            self.inputs.media_token_id,
            train=train,
            cfg=cfg,
            counter=self.counters[split],
            **video,
        )
        return self._capped(dataset, split)

    def _capped(self, dataset: ShardDataset, split: str) -> ShardDataset:
        """``dataset`` cut to the split's sample cap (``val_samples`` / ``test_samples``).

        Evaluation reads shards in order, so the cap keeps the same samples every time.
        It is split over ranks x workers; workers without shards yield nothing, so the
        cap is an upper bound.
        """
        cap = self.caps[split]
        if cap is not None:
            _, world_size, _, _ = wds.utils.pytorch_worker_info()
            dataset.append(wds.slice(math.ceil(cap / (world_size * max(1, self.config.num_workers)))))
        return dataset

    def _loader(self, split: str) -> ResumableLoader:
        if split not in self.datasets:
            raise RuntimeError(f"the {split} dataset was not built: call setup() for its stage first")
        assert self.inputs is not None
        cfg = self.config
        if split != "train":
            cfg = dataclasses.replace(cfg, batch_size=self.hparams.eval_batch_size or cfg.batch_size)
        return build_loader(self.datasets[split], cfg, self.inputs.tokenizer.pad_id,
                            pin_memory=torch.cuda.is_available(), **self._collate())

    def _collate(self) -> dict[str, Any]:
        """Extra :func:`~mm_llama.data.pipeline.build_loader` arguments (a subclass's own collate)."""
        return {}

    def resume_at(self, position: TrainPosition) -> None:
        """Make the next training loader start at ``position`` (a restored checkpoint's)."""
        self._resume_at = position

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train")
        if self._resume_at is not None:
            # Lightning builds the iterator right after this call, before any epoch hook runs.
            self.datasets["train"].set_epoch(self._resume_at.epoch)
            loader.skip_next_pass(self._resume_at.batches)
            log.info("resuming the training data at epoch %d after %d batch(es)",
                     self._resume_at.epoch, self._resume_at.batches)
            self._resume_at = None
        return loader

    def first_train_batches(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` batches of the training split's first epoch (or all, if fewer): what a
        stage scans before it trains (its output vocabulary). The same batches however often it is
        called, whatever epoch training reached and whatever position a resume has set."""
        dataset = self.datasets.get("train")
        if dataset is None:
            raise RuntimeError("the train dataset was not built: call setup('fit') first")
        epoch = dataset.shared_epoch.get()
        dataset.set_epoch(0)
        try:
            return list(itertools.islice(self._loader("train"), n))
        finally:
            dataset.set_epoch(epoch)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def eval_batches(self, split: str) -> int | None:
        """The most batches this rank's ``split`` loader gives, counted from the built-in shards'
        manifest, the sample cap and how shards fall to ranks and workers; ``None`` when the split
        reads given URLs or has no manifest. Skipped samples make the real count smaller: this is
        a progress bar's total, never a bound on what is read.
        """
        splits = None if self.urls[split] is not None else manifest_splits(self.data_dir)
        if splits is None:
            return None
        info = splits[split]
        n_shards, per_shard = info["n_shards"], info["samples_per_shard"]
        sizes = [per_shard] * (n_shards - 1) + [info["n_samples"] - per_shard * (n_shards - 1)]
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()  # as the dataset splits its shards
        workers, cap = max(1, self.hparams.num_workers), self.caps[split]
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        mine = sizes[rank::world_size]  # wds.split_by_node, then wds.split_by_worker
        total = 0
        for worker in range(workers):
            samples = sum(mine[worker::workers])
            if cap is not None:
                samples = min(samples, math.ceil(cap / (world_size * workers)))
            total += math.ceil(samples / batch_size)
        return total

    # --- skipped samples ----------------------------------------------------------------
    def skipped(self) -> dict[str, dict[str, int]]:
        """Skipped samples so far, per split: ``{"train": {"total": n, kind: n, ...}, ...}``
        (kinds with a zero count are left out)."""
        out = {}
        for split, counter in self.counters.items():
            counts = counter.counts()
            out[split] = {"total": sum(counts.values()), **{k: v for k, v in counts.items() if v}}
        return out

    def retried_shards(self) -> dict[str, int]:
        """Remote shards opened again after a broken stream so far, per split (their samples
        arrived: not skips; :class:`~mm_llama.data.shard_reader.ShardReader`)."""
        return {split: counter.retries for split, counter in self.counters.items()}

    def log_skipped(self, split: str) -> None:
        """Log ``split``'s skip counts: a warning when any sample was skipped; a zero count only
        for the test split (once a run) at info level, for training and validation (every epoch
        and every validation) at debug level."""
        counts = self.skipped()[split]
        level = logging.WARNING if counts["total"] else logging.INFO if split == "test" else logging.DEBUG
        log.log(level, "%s: %d sample(s) skipped so far %s", split, counts["total"],
                {k: v for k, v in counts.items() if k != "total"})


@dataclass(frozen=True)
class TrainPosition:
    """Where training is in the data: ``batches`` consumed so far in epoch ``epoch``."""

    epoch: int
    batches: int


class _DataEpochHooks(L.Callback):
    """Sets the training shards' epoch, logs skip counts and checkpoints the position in the
    training data; added to the trainer by :meth:`ImageDataModule.setup` (a data module gets
    no epoch hooks of its own)."""

    def __init__(self, datamodule: ImageDataModule) -> None:
        self.datamodule = datamodule
        self.position = TrainPosition(epoch=0, batches=0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the epoch's DataLoader iterator is created (not on a mid-epoch restart:
        # then the restored position has set the epoch); with persistent workers the
        # shared-memory epoch reaches them on the iterator reset.
        self.position = TrainPosition(trainer.current_epoch, 0)
        dataset = self.datamodule.datasets.get("train")
        if dataset is not None:
            dataset.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Counted at the start, so a checkpoint written at this batch's end includes it. After the
        # epoch's last batch (Lightning's prefetch already knows it is the last), the position is the
        # start of the next epoch: a resume from there must not replay or skip into this one.
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.position = TrainPosition(trainer.current_epoch + 1, 0)
        else:
            self.position = TrainPosition(trainer.current_epoch, self.position.batches + 1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batches": self.position.batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.position = TrainPosition(state_dict["epoch"], state_dict["batches"])
        self.datamodule.resume_at(self.position)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(pl_module, "test")

    def _log(self, pl_module: L.LightningModule, split: str) -> None:
        self.datamodule.log_skipped(split)
        total = float(self.datamodule.skipped()[split]["total"])
        pl_module.log(f"data/skipped_{split}", total, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)
