"""A DataLoader that can start a pass part-way through: the data half of a mid-epoch resume.

An iterable WebDataset has no index to seek to, but its order within an epoch is a
pure function of (seed, epoch, rank, worker): :meth:`ShardDataset.set_epoch` plus
"skip the first ``n`` batches" reproduces exactly the batches an interrupted run
had not yet consumed. The skip is applied to whole *batches* in the main process,
after the workers have built them, so it stays exact whatever the number of
workers, however unevenly the shards are split between them (a worker that runs
dry changes the round-robin order, identically in both runs), and whatever number
of corrupt samples were dropped. The price is decoding the skipped batches once
more, cheap next to training on them.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader

_END = object()


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose next pass can begin after its first ``n`` batches.

    ``skip_next_pass(n)`` applies to the next ``iter()`` only; later passes (epochs)
    start at their first batch again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip_next_pass(self, batches: int) -> None:
        """Drop the first ``batches`` batches of the next pass (they were already trained on)."""
        if batches < 0:
            raise ValueError(f"batches to skip must be >= 0, got {batches}")
        self._skip = batches

    @property
    def pending_skip(self) -> int:
        """Batches the next pass will drop."""
        return self._skip

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            if next(iterator, _END) is _END:  # the pass was already over: nothing left of it
                break
        return iterator
