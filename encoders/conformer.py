"""Conformer blocks of the speech encoder (Llama 3 §8.1; Gulati et al. 2020).

* :class:`FrameStacking`: stride-4 stacking of 10 ms feature frames + a linear projection
  (40 ms frames), the paper's subsampling front.
* :class:`ConformerLayer`: half-step macaron FFN, rotary multi-head self-attention,
  convolution module (pointwise + GLU, depthwise kernel 7, norm, SiLU, pointwise),
  second half-step FFN, final LayerNorm.

Padding masks are honoured everywhere: attention never looks at padded frames, and the
convolution module zeroes them before its depthwise convolution, so a padded batch gives
every utterance the output it gets alone (tested). For the same reason the convolution
module normalises with LayerNorm over channels rather than the original BatchNorm,
whose batch statistics would mix padding (and other utterances) into every frame.

Shape legend: ``b`` batch, ``t`` 10 ms frames, ``n`` encoder frames, ``m`` mel bins, ``d`` width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.rotary_attention import FeedForward, RotarySelfAttention


def stack_frames(feats: torch.Tensor, stride: int) -> torch.Tensor:
    """``[b, t, m]`` → ``[b, ceil(t / stride), stride * m]``, a last partial group completed with zeros."""
    b, t, m = feats.shape
    extra = -t % stride
    feats = F.pad(feats, (0, 0, 0, extra))  # [b, t', m], t' a multiple of stride
    return feats.reshape(b, (t + extra) // stride, stride * m)


class FrameStacking(nn.Module):
    """Stack ``stride`` consecutive frames and project: ``[b, t, m]`` → ``[b, ceil(t / stride), d]``.

    A last, partial group is completed with zero frames (so no speech is dropped).
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int = 4) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"stacking stride must be >= 1, got {stride}")
        self.stride = stride
        self.proj = nn.Linear(in_dim * stride, out_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames out of ``lengths [b]`` frames in: ``ceil(t / stride)``."""
        return (lengths + self.stride - 1) // self.stride

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats [b, t, m]`` (padded frames zero), ``lengths [b]`` → ``[b, n, d]``, ``[b]``."""
        return self.proj(stack_frames(feats, self.stride)), self.output_lengths(lengths)


class ConvModule(nn.Module):
    """Conformer convolution module with a padding mask."""

    def __init__(self, dim: int, kernel_size: int = 7, dropout: float = 0.0) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"depthwise kernel size must be odd (same-length output), got {kernel_size}")
        self.norm_in = nn.LayerNorm(dim)
        self.pointwise_in = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm_mid = nn.LayerNorm(dim)
        self.pointwise_out = nn.Conv1d(dim, dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [b, n, d]``, ``mask [b, n]`` → ``[b, n, d]`` (padded frames 0)."""
        keep = mask[:, None, :].to(x.dtype)  # [b, 1, n]
        y = F.glu(self.pointwise_in(self.norm_in(x).transpose(1, 2)), dim=1)  # [b, d, n]
        y = self.depthwise(y * keep)  # padding contributes exactly the zeros of the conv's own padding
        y = F.silu(self.norm_mid(y.transpose(1, 2)))  # [b, n, d]
        y = self.pointwise_out(y.transpose(1, 2)).transpose(1, 2)  # [b, n, d]
        return self.drop(y) * keep.transpose(1, 2)


class ConformerLayer(nn.Module):
    """``x + ½ FFN``, ``+ MHSA``, ``+ Conv``, ``+ ½ FFN``, LayerNorm (macaron structure)."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, kernel_size: int = 7, dropout: float = 0.0,
                 rope_theta: float = 10_000.0) -> None:
        super().__init__()
        self.ffn1 = FeedForward(dim, ffn_dim, dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = RotarySelfAttention(dim, n_heads, rope_theta, dropout)
        self.attn_drop = nn.Dropout(dropout)
        self.conv = ConvModule(dim, kernel_size, dropout)
        self.ffn2 = FeedForward(dim, ffn_dim, dropout)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [b, n, d]``, ``mask [b, n]`` (True = real frame) → ``[b, n, d]`` (padded frames 0)."""
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn_drop(self.attn(self.attn_norm(x), mask))
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ffn2(x)
        return self.norm_out(x) * mask[..., None]
