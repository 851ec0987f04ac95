"""Generic building blocks shared by the frozen LM and the adapters.

Nothing here knows about any particular model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (computed in fp32, cast back), as in Llama.

    Through ``F.rms_norm``: the same values as the spelled-out ``x * rsqrt(mean(x²) + eps)``
    (bit for bit on CPU), and on CUDA one fused kernel each way where the spelled-out form
    launches several (16 kernels forward + backward instead of 30, measured on an H100).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d]`` → same shape."""
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class _SiluMul(torch.autograd.Function):
    """``silu(g) * u`` that saves only ``g`` and ``u`` for backward.

    Autograd's composition also keeps ``silu(g)``, a third ``[..., hidden]`` tensor per MLP
    (of a Llama block's ~7 saved activations the largest, with ``g`` and ``u``); here it is
    recomputed in the backward pass instead, which costs one elementwise op.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g, u = ctx.saved_tensors
        grad_g = torch.ops.aten.silu_backward(grad * u, g) if ctx.needs_input_grad[0] else None
        grad_u = grad * F.silu(g) if ctx.needs_input_grad[1] else None
        return grad_g, grad_u


class SwiGLU(nn.Module):
    """Gated feed-forward ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d]`` → ``[..., d]``."""
        return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))
