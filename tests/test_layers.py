"""Generic blocks: the memory-lean SwiGLU computes what autograd's composition computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_llama.layers import SwiGLU


def saved_bytes(fn, module: torch.nn.Module) -> int:
    """Bytes of distinct tensor storages autograd saves while running ``fn`` (``module``'s weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def reference(mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def test_swiglu_matches_autograd_composition_in_values_and_gradients():
    mlp = SwiGLU(8, 24).double()
    x = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    ours, ref = mlp(x), reference(mlp, x)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(ours.square().sum(), [x, *mlp.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *mlp.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    torch.autograd.gradcheck(lambda a: SwiGLU.forward(mlp, a), (x,))


def test_frozen_swiglu_saves_two_hidden_tensors_not_three():
    mlp = SwiGLU(16, 64).requires_grad_(False)  # a frozen LM's MLP, with a gradient flowing through it
    x = torch.randn(4, 16, requires_grad=True)
    hidden = 4 * 64 * 4  # one [4, 64] fp32 tensor
    assert saved_bytes(lambda: reference(mlp, x), mlp) == 3 * hidden
    assert saved_bytes(lambda: mlp(x), mlp) == 2 * hidden
