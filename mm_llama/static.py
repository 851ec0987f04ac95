"""Static shapes and no host reads: what the model's code owes a CUDA graph.

A CUDA graph replays fixed kernels on fixed buffers, so code captured into one may neither
read a device value on the host (``bool(t.any())``, ``.item()``) nor make a shape that
depends on one (boolean indexing, ``nonzero``). The few places in the model that would
(an early exit when no media token is present, the labelled-rows gather of the loss)
ask :func:`must_stay_static` and take a fixed-shape path instead.

Two things switch it on: a CUDA stream under capture (:class:`mm_llama.generation.StaticStep`,
:class:`mm_llama.training.graphed_step.GraphedTrainStep`), and :func:`static_shapes`, which
runs the same fixed-shape code eagerly on any device: the warm-up steps before a capture
and the CPU tests that show the captured code reads nothing on the host.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


@contextlib.contextmanager
def static_shapes() -> Iterator[None]:
    """Within this block, :func:`must_stay_static` is true for every tensor (nestable)."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def must_stay_static(t: torch.Tensor) -> bool:
    """Whether code handling ``t`` must keep fixed shapes and skip host reads of device values."""
    return getattr(_state, "depth", 0) > 0 or (t.is_cuda and torch.cuda.is_current_stream_capturing())
