"""Lightning checkpoint I/O that never leaves a half-written checkpoint under its final name.

Lightning 2.6's ``TorchCheckpointIO`` serialises into memory first (a failing ``torch.save``
writes nothing) but then writes through an fsspec transaction whose local temporary file
is made by ``tempfile.mkstemp()`` in the *system* temporary directory and moved into place
with ``shutil.move``: when that directory is on another file system (a tmpfs ``/tmp``, a
checkpoint directory on network or scratch storage) the move is a copy, and a job killed
during it leaves a truncated ``last.ckpt``; nothing is fsync-ed either. Local checkpoints
are therefore written with :func:`mm_llama.checkpoint_files.atomic_write` (temporary file in
the same directory, fsync, ``os.replace``); remote URLs keep Lightning's own path.

Pre-training stages keep their own resumable state with :class:`StageCheckpoint`.

Reading wraps Lightning's with :func:`mm_llama.checkpoint_files.checkpoint_read_errors`, so a
truncated checkpoint passed to ``fit(ckpt_path=...)`` / ``--resume`` fails with a
:class:`~mm_llama.checkpoint_files.CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mm_llama.checkpoint_files import atomic_write, checkpoint_read_errors

log = logging.getLogger(__name__)

CLASS_PATH = "mm_llama.training.checkpoint_io.AtomicCheckpointIO"
"""How LightningCLI configs name :class:`AtomicCheckpointIO` (``trainer.plugins``)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes and a clear error for corrupt files.

    Use: ``L.Trainer(plugins=[AtomicCheckpointIO()])`` (``train_adapter.py`` and ``mm-llama``
    do this by default).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_write(path) as file:
            torch.save(checkpoint, file)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        with checkpoint_read_errors(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


class StageCheckpoint:
    """The resumable state of a pre-training stage (image/video stage 1, speech CTC, BEST-RQ):
    ``out / f"{name}_last.ckpt"``, beside stage 2's ``last.ckpt``, written atomically every
    ``every`` optimizer steps and when the stage ends.

    A stage killed part-way is continued from it with ``--resume`` (weights, optimizer, schedule,
    position in the data, generators: the stage ends as a run that never stopped would); a stage
    that had finished is restored at its last step and trains nothing.

    Use::

        stage = StageCheckpoint(out, "ctc", every=50)
        trainer = L.Trainer(callbacks=[..., *stage.callbacks()], plugins=stage.plugins(), ...)
        stage.fit(trainer, module, datamodule, resume)
    """

    def __init__(self, out: str | os.PathLike, name: str, every: int) -> None:
        if every < 1:
            raise ValueError(f"a stage's checkpoint interval must be >= 1 step, got {every}")
        self.out, self.name, self.every = Path(out), name, every

    @property
    def path(self) -> Path:
        """Where the stage's state is written."""
        return self.out / f"{self.name}_last.ckpt"

    def callbacks(self) -> list[L.Callback]:
        """The writer (a ``ModelCheckpoint`` that keeps only the stage's last state)."""
        saver = ModelCheckpoint(dirpath=str(self.out), save_last=True, save_top_k=0, every_n_train_steps=self.every,
                                enable_version_counter=False)
        saver.CHECKPOINT_NAME_LAST = self.path.stem  # beside stage 2's last.ckpt, never over it
        return [saver]

    def plugins(self) -> list[AtomicCheckpointIO]:
        """Atomic writes: a kill during one never leaves a half-written state under the name."""
        return [AtomicCheckpointIO()]

    def fit(self, trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
            resume: bool) -> None:
        """``trainer.fit`` the stage on ``datamodule``'s training split, from its state if ``resume``.

        Through the data module, whose callback sets each epoch's shuffle and, resumed, the
        position in the data; its validation split is offered but a stage does not validate.
        """
        start = self.resume_from(resume)
        if start is not None:
            self.check_fits(module, start)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
            trainer.fit(module, datamodule=datamodule, ckpt_path=start)

    def check_fits(self, module: torch.nn.Module, path: Path) -> None:
        """Refuse, naming the file and the first mismatches, a state written for another model: other
        parameter names or shapes (the stage's settings changed since it was written)."""
        with checkpoint_read_errors(path):  # a truncated file: CorruptCheckpointError naming it
            saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("state_dict", {})
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in saved.items()}
        problems = [f"missing {k}" for k in sorted(expected.keys() - found.keys())]
        problems += [f"unexpected {k}" for k in sorted(found.keys() - expected.keys())]
        problems += [f"{k}: {list(found[k])} in the file, {list(expected[k])} here"
                     for k in sorted(expected.keys() & found.keys()) if found[k] != expected[k]]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(
                f"{path} holds the {self.name} stage of another model: {'; '.join(problems[:5])}{more}. "
                "Resume with the settings it was written with, or delete it to start the stage over"
            )

    def resume_from(self, resume: bool) -> Path | None:
        """The state to continue from: the file if ``resume`` and it exists, else ``None`` (fresh)."""
        if resume and self.path.is_file():
            log.info("resuming the %s stage from %s", self.name, self.path)
            return self.path
        return None
