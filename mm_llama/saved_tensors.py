"""The activation memory of a forward pass, counted exactly: what autograd keeps for backward."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")


def saved_for_backward(fn: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> tuple[T, int]:
    """Run ``fn()``; return its result and the bytes of the distinct storages autograd saved for backward.

    Storages of ``exclude`` (e.g. a model's parameters, and views of them) are left out: what
    remains is the activation memory a training step holds when its backward pass starts,
    independent of the allocator and of anything else running on the machine. Recomputed blocks
    (activation checkpointing) save only their inputs, so the count shows what they spare.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())
