"""Checkpoint and artefact files that are never half-written, and clear errors for broken ones.

:func:`atomic_write` writes into a temporary file in the target's directory, flushes it to
disk and then ``os.replace``-s it over the target: on POSIX the rename is atomic within a
file system, so a reader (or a resumed run) sees the previous complete file or the new
complete file, never a truncated one, whatever kills the writer. (Writing the temporary
file elsewhere, e.g. in ``/tmp``, would not do: across file systems a "move" is a copy.)

:func:`checkpoint_read_errors` turns a failed ``torch.load`` of a broken file (truncated,
emptied, overwritten) into a :class:`CorruptCheckpointError` naming the file, instead of a
traceback from deep inside the unpickler; a load that fails for any other reason (a
readable file of the wrong kind) is re-raised unchanged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, empty, not a ``torch.save`` archive)."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a file whose content replaces ``path`` only if the ``with`` block completes.

    Args:
        path: the final file name; its directory must exist.
        mode: ``"wb"`` (binary) or ``"w"`` (text).
        encoding: text encoding (text mode; default UTF-8).

    On an exception the temporary file is removed and ``path`` is left as it was.
    The new file gets the mode of the file it replaces, or the usual ``0o666 & ~umask``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)  # ... and the rename itself survives a power cut


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)  # the only way to read the umask is to set it
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` (zip) archive, or ``None`` when it is one.

    Reads the whole file once (zip central directory plus every member's CRC).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"it is not a complete torch.save archive ({size:,} bytes, no zip directory at the end: truncated?)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exn:
        return f"its zip archive is damaged ({size:,} bytes): {exn}"
    if bad is not None:
        return f"its member {bad!r} fails its CRC check ({size:,} bytes)"
    return None


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` if it is not a complete ``torch.save``
    archive (see :func:`unreadable_reason`); for callers that must fail before a library reads it."""
    reason = unreadable_reason(path)
    if reason is not None:
        raise CorruptCheckpointError(_message(path, reason))


def _message(path: str | os.PathLike, reason: str) -> str:
    return (f"checkpoint {os.fspath(path)} cannot be read: {reason}. It was probably cut short by an "
            "interrupted write or copy; use an earlier checkpoint.")


@contextlib.contextmanager
def checkpoint_read_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a failed read of the checkpoint ``path`` as :class:`CorruptCheckpointError`
    when the file itself is broken (see :func:`unreadable_reason`); other errors pass unchanged."""
    try:
        yield
    except Exception as exn:
        if not os.path.isfile(path):
            raise
        reason = unreadable_reason(path)
        if reason is None:
            raise
        detail = f"{type(exn).__name__}: {str(exn).splitlines()[0][:200] if str(exn) else ''}"
        # `from None`: the unpickler's traceback says nothing the message does not.
        raise CorruptCheckpointError(f"{_message(path, reason)} (torch.load said {detail})") from None
