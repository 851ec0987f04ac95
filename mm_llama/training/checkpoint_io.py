"""Lightning checkpoint I/O that never leaves a half-written checkpoint under its final name.

Lightning 2.6's ``TorchCheckpointIO`` serialises into memory first (a failing ``torch.save``
writes nothing) but then writes through an fsspec transaction whose local temporary file
is made by ``tempfile.mkstemp()`` in the *system* temporary directory and moved into place
with ``shutil.move``: when that directory is on another file system (a tmpfs ``/tmp``, a
checkpoint directory on network or scratch storage) the move is a copy, and a job killed
during it leaves a truncated ``last.ckpt``; nothing is fsync-ed either. Local checkpoints
are therefore written with :func:`mm_llama.checkpoint_files.atomic_write` (temporary file in
the same directory, fsync, ``os.replace``); remote URLs keep Lightning's own path.

Reading wraps Lightning's with :func:`mm_llama.checkpoint_files.checkpoint_read_errors`, so a
truncated checkpoint passed to ``fit(ckpt_path=...)`` / ``--resume`` fails with a
:class:`~mm_llama.checkpoint_files.CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mm_llama.checkpoint_files import atomic_write, checkpoint_read_errors

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
