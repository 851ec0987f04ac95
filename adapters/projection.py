"""Projection of encoder features into the LM's width."""

from __future__ import annotations

import torch
from torch import nn

from mm_llama.layers import RMSNorm


class MediaProjection(nn.Module):
    """``[b, s_e, d_e]`` encoder tokens → ``[b, s_e, d]`` cross-attention K/V source.

    A single linear map as in Llama 3.2 Vision's projector, followed by RMSNorm so
    that the K/V source has unit scale whatever the encoder's feature statistics.
    ``norm=False`` leaves the norm out: exactly Llama 3.2 Vision's projector (Linear + bias).
    """

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-5, norm: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = RMSNorm(out_dim, eps) if norm else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [b, s_e, d_e]`` → ``[b, s_e, d]``."""
        return self.norm(self.proj(tokens))
