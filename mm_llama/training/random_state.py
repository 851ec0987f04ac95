"""Random-number generator states in checkpoints: a resumed run draws what the uninterrupted one drew.

Training draws random numbers at every step wherever a model has dropout or augmentation: the
speech encoder's SpecAugment masks and its dropout, the speech adapter's dropout. Lightning's
checkpoints hold no generator state, so a run resumed from one draws other numbers than the run
that never stopped, and its losses part from that run's from the first step on (the tiny speech
model: by up to 3e-3 over 11 steps). :class:`RandomStateCheckpoint` saves the states of every
rank's generators (torch's CPU and CUDA ones, NumPy's and Python's) with each checkpoint, and puts
each rank's back just before the first training step after a resume.

The data order needs none of this: the shard and sample shuffles have their own seeded generators
(:mod:`mm_llama.data.pipeline`), and the position in the data is checkpointed by the data module.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn


def generator_states() -> dict[str, Any]:
    """The states of this process's global generators: torch (CPU, and every CUDA device once CUDA
    is initialised), NumPy and Python. Only tensors, numbers and strings, so that a checkpoint
    holding them still loads with ``torch.load(weights_only=True)`` (Lightning's default)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }


def set_generator_states(states: dict[str, Any]) -> None:
    """Put back what :func:`generator_states` returned (CUDA's only where CUDA is initialised)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_rank_streams(rank: int) -> int:
    """Reseed this process's torch (CPU and CUDA), NumPy and Python generators for ``rank``, from
    torch's initial seed (what ``seed_everything`` set): every rank of a run its own streams, the same
    ones in every run with that seed. Returns the new seed."""
    digest = hashlib.sha256(f"{torch.initial_seed()}/rank{rank}".encode()).digest()
    seed = int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return seed


class RandomStateCheckpoint(L.Callback):
    """Saves every rank's generator states in each checkpoint; after a resume, puts this rank's
    back at the start of the first training batch (after the data loader has started, where the
    run that never stopped was when it saved them). Added by the ``configure_callbacks`` of
    :class:`~mm_llama.training.module.AdapterModule` and of stage 1's
    :class:`~mm_llama.training.encoder_pretrain.EncoderPretrainModule`, so the Lightning CLI and
    ``train_adapter.py`` both get it.

    A checkpoint written by another number of ranks, or without these states (older ones), resumes
    with the generators as they are, and says so.

    With several ranks each also gets its own streams when training starts (:func:`seed_rank_streams`):
    ``seed_everything`` seeds every rank alike (so that they build the same initial weights), and
    would otherwise have every rank draw the same dropout and SpecAugment masks for its own samples.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's states, gathered (every rank saves a checkpoint; rank 0 writes it)."""
        states = generator_states()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return {"ranks": [states]}
        gathered: list[dict[str, Any] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, states)
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("ranks")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:  # after the weights are built alike; a resume's states still win
            seed_rank_streams(trainer.global_rank)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending, None
        if len(ranks) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the random states of {len(ranks)} rank(s), this run has "
                           f"{trainer.world_size}: resuming with fresh random draws (dropout, augmentation)")
            return
        set_generator_states(ranks[trainer.global_rank])
