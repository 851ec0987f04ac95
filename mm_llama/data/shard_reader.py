"""Tar shards → raw samples, a remote shard read again from where its stream broke.

What ``wds.tarfile_to_samples`` does (open each URL, expand the tar, group members by key), one
shard at a time, with one difference: a **remote** shard (``http(s)://``, streamed by webdataset
through ``curl``; ``pipe:<command>``) whose stream breaks part-way (a dropped connection, a storage
node restarting) is opened again, up to ``retries`` times in a row with a growing pause, and its first
samples, delivered before the break, are passed over: every sample arrives once, in the shard's
order, as if the stream had never broken. curl's own ``--retry`` (webdataset passes 30) covers a
failure *before* the first byte only; once bytes have gone down the pipe it cannot start over.

A local shard is not retried (reading a truncated file again gives the same bytes), nor is a remote
one that sent nothing at all (a 404, a missing file: the command's own retries, curl's, have had
their turn), nor one that still fails after its retries: the error goes to ``handler`` (the pipeline's
:meth:`~mm_llama.data.pipeline.SkipCounter.handler`: counted as ``read_error`` and logged with the
URL), and the samples delivered before it are kept.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from webdataset.gopen import Pipe
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

logger = logging.getLogger(__name__)

_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through a command or a network scheme (``pipe:``, ``http(s)://``,
    ``s3://``, ...), not from a local path (``file://`` is local)."""
    return bool(_REMOTE.match(url)) and not url.startswith("file://")


class _CountedStream:
    """A shard's byte stream that counts what was read from it (:attr:`bytes_read`).

    A webdataset ``Pipe`` checks its command's exit status after every read and raises as soon as
    the command has failed, dropping what the command wrote before it failed and what that read
    returned. Here a pipe's output is read to its end first, and the exit status checked there:
    every sample the command sent arrives, and a retry starts after the last of them.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.bytes_read = 0

    def read(self, *args: Any) -> bytes:
        pipe = self.stream if isinstance(self.stream, Pipe) else None
        data = (pipe.stream if pipe is not None else self.stream).read(*args)
        self.bytes_read += len(data)
        if pipe is not None and not data:
            pipe.wait_for_child()  # the end of its output: raises if the command failed
        return data

    def close(self) -> None:
        self.stream.close()

    def __str__(self) -> str:  # webdataset names the stream in its error messages
        return str(self.stream)


def shard_files(url: str, counted: list[_CountedStream] | None = None) -> Iterator[dict[str, Any]]:
    """The files of one shard (``{"fname", "data", "__url__"}``), in tar order.

    Any error is raised (with the URL in its args, as webdataset appends it), and the shard's
    stream is closed when the iteration ends, however it ends. ``counted``: the opened stream is
    appended to it, to read :attr:`_CountedStream.bytes_read` after an error.
    """
    counted = [] if counted is None else counted

    def opened() -> Iterator[dict[str, Any]]:
        for source in url_opener([{"url": url}], handler=reraise_exception):
            source["stream"] = _CountedStream(source["stream"])
            counted.append(source["stream"])
            yield source

    try:
        for file in tar_file_expander(opened(), handler=reraise_exception):
            if file:  # not the end-of-shard marker
                yield file
    except Exception as exn:  # webdataset put the stream into the args: the stream it opened
        exn.args = tuple(a.stream if isinstance(a, _CountedStream) else a for a in exn.args)
        raise
    finally:
        for stream in counted:
            try:
                stream.close()
            except Exception:  # a broken pipe's close reports its exit status again; already handled
                pass


class _Grouper:
    """A shard's files → samples (consecutive files with one key: ``{"__key__", "__url__", ext: bytes}``),
    as webdataset's ``group_by_keys``, keeping the sample being read in :attr:`pending` and the
    number of samples completed in :attr:`completed`, for when the stream breaks. A repeated
    extension within a sample goes to ``handler`` (the repeat is dropped when it returns ``True``)."""

    def __init__(self, handler: Callable[[Exception], bool]) -> None:
        self.handler = handler
        self.pending: dict[str, Any] | None = None
        self.completed = 0

    def __call__(self, files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for file in files:
            key, ext = base_plus_ext(file["fname"])
            if key is None:
                continue
            if self.pending is not None and key != self.pending["__key__"]:
                sample, self.pending = self.pending, None
                self.completed += 1
                yield sample
            if self.pending is None:
                self.pending = {"__key__": key, "__url__": file["__url__"]}
            ext = ext.lower()
            if ext in self.pending:
                exn = ValueError(f"{file['fname']}: duplicate file name in tar file {ext} {list(self.pending)}")
                exn.args += (None, file["__url__"])
                if not self.handler(exn):
                    raise exn
                continue
            self.pending[ext] = file["data"]
        if self.pending is not None:
            sample, self.pending = self.pending, None
            self.completed += 1
            yield sample


class ShardReader:
    """Pipeline stage: ``{"url": ...}`` dicts → raw samples, remote streams resumed (module docstring).

    Args:
        handler: called with the error of a shard that cannot be read (after its retries); returns
            ``True`` to go on with the next shard, ``False`` to raise the error.
        retries: how many times in a row a broken remote shard is opened again without getting
            further (0: never); a retry that delivers new samples before it breaks starts the
            count again, so a long shard on a flaky link is read to its end.
        pause_s: seconds before the first retry, doubled for each further one.
        on_retry: called with the URL each time a shard is opened again (the pipeline's tally).
    """

    def __init__(self, handler: Callable[[Exception], bool] = reraise_exception, retries: int = 3,
                 pause_s: float = 1.0, on_retry: Callable[[str], None] | None = None) -> None:
        if retries < 0 or pause_s < 0:
            raise ValueError(f"ShardReader needs retries >= 0 and pause_s >= 0, got {retries}, {pause_s}")
        self.handler = handler
        self.retries = retries
        self.pause_s = pause_s
        self.on_retry = on_retry

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in src:
            yield from self.read(shard["url"])

    def read(self, url: str) -> Iterator[dict[str, Any]]:
        """The samples of the shard at ``url``, each once (module docstring)."""
        delivered = 0
        attempt = 0
        while True:
            counted: list[_CountedStream] = []
            grouper = _Grouper(self.handler)
            before = delivered
            try:
                for i, sample in enumerate(grouper(shard_files(url, counted))):
                    if i >= delivered:  # the ones before went out before the stream broke
                        delivered += 1
                        yield sample
                return
            except Exception as exn:
                broke = bool(counted) and counted[0].bytes_read > 0  # not: nothing came at all (404, no file)
                if delivered > before:  # this attempt got further: the retries count from here
                    attempt = 0
                if attempt < self.retries and broke and is_remote(url):
                    attempt += 1
                    pause = self.pause_s * 2 ** (attempt - 1)
                    logger.warning("shard %s broke after %d samples (%s: %s); reading it again from there "
                                   "in %.1f s (retry %d of %d)", url, delivered, type(exn).__name__,
                                   str(exn.args[0] if exn.args else exn)[:200], pause, attempt, self.retries)
                    if self.on_retry is not None:
                        self.on_retry(url)
                    time.sleep(pause)
                    continue
                # The sample the break cut into goes on with what was read of it (as webdataset's reader
                # does): the decode stage finds out whether it is whole and counts it if not.
                if grouper.pending is not None and grouper.completed >= delivered:
                    yield grouper.pending
                if self.handler(exn):
                    return
                raise
