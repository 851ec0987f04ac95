"""A whole training step (loss, backward, clipping, optimizer step) replayed as one CUDA graph.

A small model's eager step is bound by launching its kernels from Python, not by the GPU:
stop 26's H200 ran the benchmark's step (batch 4 x 128, SmolLM2-135M shape, ~0.3 TFLOP) in
126 ms, about 0.5 % of the card's bf16 peak. Decoding had the same problem and got
:class:`mm_llama.generation.StaticStep`; this is the training side's counterpart, after the
"whole-network capture" recipe in PyTorch's CUDA-graph notes: warm up on a side stream,
capture forward, backward and ``optimizer.step()`` into one graph, then feed each batch by
copying it into the graph's input buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch

from mm_llama.static import static_shapes

# Optimizers whose fresh per-parameter state is all zeros (moments and step count), so the
# state the warm-up creates can be put back to "never stepped" in place.
ZERO_INIT_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


class GraphedTrainStep:
    """One training step with static shapes: on CUDA captured once as a graph, then replayed.

    The first call on CUDA runs ``warmup_steps`` eager steps on a side stream (lazy inits:
    cuBLAS handles, the optimizer's state), puts every trainable parameter and optimizer state
    back as it was before them, and captures one step. Each call then copies its batch into
    the graph's input buffers and replays: the same step, without a Python launch per kernel.
    Elsewhere every call runs that step eagerly (the path the CPU tests compare with a plain
    loop), under :func:`~mm_llama.static.static_shapes`.

    What the step may contain (checked on CPU by ``tests/test_graphed_step.py``):

    - ``loss_fn`` keeps fixed shapes and reads no device value on the host: for the fused
      model, ``MultimodalLlama.loss(..., max_labeled=n)`` (:mod:`mm_llama.static`). Batches are
      not validated here: check their labelled counts against ``n`` before calling.
    - On CUDA the optimizer must be graph-safe (``capturable=True`` or ``fused=True``) and one of
      :data:`ZERO_INIT_OPTIMIZERS`. Float learning rates become device tensors, so a scheduler's
      later change (which writes the tensor in place) reaches the replays.
    - The parameters' ``.grad`` live in the graph's memory; each replay overwrites them.

    Args:
        loss_fn: the batch's tensors, as keywords → the scalar loss.
        optimizer: steps every trainable parameter.
        example: one batch (name → tensor); its shapes, dtypes and device are the graph's.
        max_grad_norm: clip the global gradient norm to this inside the step; ``None``: no clipping.
        autocast_dtype: run ``loss_fn`` under autocast to this dtype (e.g. ``torch.bfloat16``),
            its weight-cast cache off (casts made in a capture would live in the graph's pool).
        warmup_steps: eager steps before the capture, undone afterwards; default 3 on CUDA
            and 0 elsewhere (where nothing is captured; the tests ask for some to check the undo).
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
                 example: Mapping[str, torch.Tensor], *, max_grad_norm: float | None = None,
                 autocast_dtype: torch.dtype | None = None, warmup_steps: int | None = None) -> None:
        if not example:
            raise ValueError("GraphedTrainStep needs an example batch with at least one tensor")
        self.loss_fn, self.optimizer, self.max_grad_norm = loss_fn, optimizer, max_grad_norm
        self.inputs = {k: v.detach().clone() for k, v in example.items()}  # the graph's input buffers
        self.device = next(iter(self.inputs.values())).device
        self.cuda = self.device.type == "cuda"
        self.autocast_dtype = autocast_dtype
        self.warmup_steps = (3 if self.cuda else 0) if warmup_steps is None else warmup_steps
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.cuda:
            check_graph_safe(optimizer, self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None  # the graph's output buffer
        self.prepared = False

    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        """Train on ``batch`` (the example's names, shapes and dtypes); return the loss (a copy)."""
        self._copy_in(batch)
        if not self.prepared:
            self._prepare()
        if self.graph is not None:
            self.graph.replay()
            return self.loss.detach().clone()
        return self._step().detach()

    # --- the step -------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _step(self) -> torch.Tensor:
        with static_shapes():
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss = self.loss_fn(**self.inputs)
            loss.backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            self.optimizer.step()
        return loss

    # --- first call: warm up, undo, capture --------------------------------------------------
    def _prepare(self) -> None:
        self.prepared = True
        # Warm-up and capture share one side stream: per-stream lazy inits (cuBLAS workspaces)
        # then happen in the warm-up, never under capture.
        side = torch.cuda.Stream(self.device) if self.cuda else None
        if self.warmup_steps:
            params, state = self._snapshot()
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for _ in range(self.warmup_steps):
                    self._step()
            if side is not None:
                torch.cuda.current_stream(self.device).wait_stream(side)
            self._restore(params, state)
        if side is not None:
            self.optimizer.zero_grad(set_to_none=True)  # the backward under capture allocates them in the pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.loss = self._step()

    def _snapshot(self) -> tuple[list[torch.Tensor], dict]:
        params = [p.detach().clone() for p in self.params]
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[p].items()}
                 for p in self.params if p in self.optimizer.state}
        return params, state

    @torch.no_grad()
    def _restore(self, params: list[torch.Tensor], state: dict) -> None:
        """Undo the warm-up in place: the capture must see (and keep) the very same tensors."""
        for p, saved in zip(self.params, params):
            p.copy_(saved)
        for p in self.params:
            now = self.optimizer.state.get(p)
            if not now:
                continue
            if p not in state and not isinstance(self.optimizer, ZERO_INIT_OPTIMIZERS):
                raise ValueError(f"cannot undo the warm-up of {type(self.optimizer).__name__}'s fresh state; "
                                 f"GraphedTrainStep supports {[c.__name__ for c in ZERO_INIT_OPTIMIZERS]}")
            for k, v in now.items():
                if p not in state:
                    v.zero_()  # "never stepped": moments and (capturable) step count at 0
                elif torch.is_tensor(v):
                    v.copy_(state[p][k])
                else:
                    now[k] = state[p][k]
        self.optimizer.zero_grad(set_to_none=True)

    # --- checks ------------------------------------------------------------------------------
    def _copy_in(self, batch: Mapping[str, torch.Tensor]) -> None:
        if batch.keys() != self.inputs.keys():
            raise ValueError(f"batch has keys {sorted(batch)}, the graph was built for {sorted(self.inputs)}")
        for k, v in batch.items():
            buf = self.inputs[k]
            if v.shape != buf.shape or v.dtype != buf.dtype:
                raise ValueError(f"batch[{k!r}] is {tuple(v.shape)} {v.dtype}; the graph was built for "
                                 f"{tuple(buf.shape)} {buf.dtype} (a captured step has fixed shapes: pad to them)")
            buf.copy_(v, non_blocking=True)


def check_graph_safe(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``optimizer`` can be captured and its warm-up undone; turn float
    learning rates into tensors on ``device`` (a capture would freeze a float's value)."""
    if not isinstance(optimizer, ZERO_INIT_OPTIMIZERS):
        raise ValueError(f"GraphedTrainStep supports {[c.__name__ for c in ZERO_INIT_OPTIMIZERS]} on CUDA, "
                         f"got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        if not (group.get("capturable") or group.get("fused")):
            raise ValueError("a CUDA graph needs a graph-safe optimizer: build it with capturable=True or "
                             "fused=True (its step count then stays on the GPU)")
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
