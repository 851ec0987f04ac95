"""Projection of encoder features into the LM's width."""

from __future__ import annotations

import torch
from torch import nn

from mm_llama.layers import RMSNorm


class MediaProjection(nn.Module):
    """``[..., s_e, d_e]`` encoder tokens → ``[..., s_e, d]`` cross-attention K/V source.

    A single linear map as in Llama 3.2 Vision's projector, followed by RMSNorm so
    that the K/V source has unit scale whatever the encoder's feature statistics.
    ``norm=False`` leaves the norm out: exactly Llama 3.2 Vision's projector (Linear + bias).

    ``positions > 0`` adds a learned vector per token position (``position_embed [s_e, d]``,
    drawn with unit RMS like the normalised tokens) to the output: every media token then
    carries an identity the cross-attention can address ("the shape in the top left") or
    report ("where is the red circle?") without recovering it from the encoder's features.
    The gates still start at 0, so the model still equals the text-only LM at init.
    """

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-5, norm: bool = True, positions: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = RMSNorm(out_dim, eps) if norm else nn.Identity()
        self.position_embed = nn.Parameter(torch.randn(positions, out_dim)) if positions > 0 else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [..., s_e, d_e]`` → ``[..., s_e, d]``."""
        out = self.norm(self.proj(tokens))
        if self.position_embed is not None:
            if tokens.shape[-2] != len(self.position_embed):
                raise ValueError(f"MediaProjection has {len(self.position_embed)} position embeddings but got "
                                 f"{tokens.shape[-2]} tokens a media item")
            out = out + self.position_embed
        return out
