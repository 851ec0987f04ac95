"""Activation checkpointing that a BatchNorm survives.

Recomputing a block in backward runs its forward a second time, in training mode: a BatchNorm
inside it normalises with the batch's statistics both times (so the output and the gradients
are the same) but also folds the batch into its running statistics twice, and counts it twice
in ``num_batches_tracked``. torchaudio's Conformer has one in every layer's convolution module.
Here the second run's updates are undone: the recomputation runs inside
:func:`running_statistics_kept`, handed to ``torch.utils.checkpoint`` as its ``context_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

ContextFn = Callable[[], tuple[AbstractContextManager, AbstractContextManager]]


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers in ``module`` that keep running statistics."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def running_statistics_kept(norms: list[_BatchNorm]) -> Iterator[None]:
    """Put the running mean, variance and batch count of ``norms`` back as they were on exit."""
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def recompute_context_fn(module: nn.Module) -> ContextFn | None:
    """A ``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant) of ``module``: the forward
    as it is, the recomputation with ``module``'s BatchNorm statistics kept. ``None`` when
    ``module`` has no BatchNorm (nothing to keep)."""
    norms = batch_norms(module)
    if not norms:
        return None
    return lambda: (nullcontext(), running_statistics_kept(norms))


def checkpointed_call(module: nn.Module, *args: Any, forward: Callable[..., Any] | None = None) -> Any:
    """``module(*args)``, its activations recomputed in backward (non-reentrant), counting each
    batch once in any BatchNorm's running statistics. ``forward``: what to call instead of
    ``module`` itself (a bound forward of it)."""
    context_fn = recompute_context_fn(module)
    kwargs = {} if context_fn is None else {"context_fn": context_fn}
    return checkpoint(module if forward is None else forward, *args, use_reentrant=False, **kwargs)


def call_block(module: nn.Module, *args: Any, recompute: bool) -> Any:
    """``module(*args)``; with ``recompute``, through :func:`checkpointed_call` (the encoders' and the
    model's block loops, where ``recompute`` is their ``grad_checkpointing`` while grad is enabled)."""
    return checkpointed_call(module, *args) if recompute else module(*args)


class _Recomputed:
    """Mixed into a module's own class by :func:`make_recomputable`: its forward, recomputed in
    backward while :attr:`recompute` is set and grad is enabled."""

    recompute: bool = False
    _recomputed_base: type  # the module's own class, set by make_recomputable

    def forward(self, *args: Any) -> Any:
        plain = super().forward  # the module's own class's forward
        if not (self.recompute and torch.is_grad_enabled()):
            return plain(*args)
        return checkpointed_call(self, *args, forward=plain)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # Pickled as its library class, made recomputable again on load: the class made at run time
        # cannot be found by name, so ``torch.save(module)`` and spawned workers would fail on it.
        return _recomputable_from, (self._recomputed_base,), self.__getstate__()


_RECOMPUTABLE: dict[type, type] = {}


def _recomputable_class(cls: type) -> type:
    """``Recomputed<cls>``: ``cls`` with :class:`_Recomputed` mixed in, made once per class."""
    if cls not in _RECOMPUTABLE:
        _RECOMPUTABLE[cls] = type(f"Recomputed{cls.__name__}", (_Recomputed, cls),
                                  {"__module__": __name__, "_recomputed_base": cls})
    return _RECOMPUTABLE[cls]


def _recomputable_from(cls: type) -> nn.Module:
    """An empty recomputable ``cls``, for unpickling (its state is set after)."""
    module = cls.__new__(cls)
    module.__class__ = _recomputable_class(cls)
    return module


def is_recomputable(module: nn.Module) -> bool:
    """Whether :func:`make_recomputable` changed ``module``."""
    return isinstance(module, _Recomputed)


def make_recomputable(module: nn.Module) -> nn.Module:
    """Let ``module`` recompute itself in backward when its ``recompute`` attribute is set, without a
    wrapper: its parameter names, and so its state dict, stay as they are. For a library's submodule
    that runs inside the library's own forward (a hybrid ViT's convolutional stem, inside timm's), where
    the caller cannot put :func:`call_block` around the call. Returns ``module`` (changed in place)."""
    if not is_recomputable(module):
        module.__class__ = _recomputable_class(type(module))
    return module


def checkpoint_wrapper_for(module: nn.Module) -> nn.Module:
    """``module`` in torch's ``CheckpointWrapper`` (non-reentrant), with :func:`recompute_context_fn`:
    the ``checkpoint_wrapper_fn`` that FSDP's ``apply_activation_checkpointing`` takes."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    context_fn = recompute_context_fn(module)
    wrap = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return wrap(module) if context_fn is None else wrap(module, context_fn=context_fn)
