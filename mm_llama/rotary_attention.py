"""Bidirectional multi-head self-attention with rotary positions, and a plain feed-forward.

Generic blocks shared by the Conformer speech encoder and the speech adapter (Llama 3
§8.1 uses rotary attention in both). Rotary embeddings make the attention scores a
function of the *difference* of positions only, so frame ``i`` attends to frame ``j``
the same way wherever the pair sits in the utterance.

Shape legend: ``b`` batch, ``n`` frames, ``d`` width, ``h`` heads, ``h_d`` head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.rope import apply_rope, rope_cos_sin, rope_inv_freq


def frame_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``lengths [b]`` → ``[b, n]`` bool, True on the first ``lengths[i]`` frames."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention over all (unpadded) frames, RoPE on queries and keys."""

    def __init__(self, dim: int, n_heads: int, rope_theta: float = 10_000.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads or (dim // n_heads) % 2:
            raise ValueError(f"dim ({dim}) must split into {n_heads} heads of even width")
        self.n_heads, self.head_dim, self.dropout = n_heads, dim // n_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.register_buffer("inv_freq", rope_inv_freq(self.head_dim, rope_theta), persistent=False)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor | None):
        b, n, _ = x.shape
        if positions is None:
            positions = torch.arange(n, device=x.device).expand(b, n)
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [b, h, n, h_d]
        cos, sin = rope_cos_sin(positions, self.inv_freq)  # [b, 1, n, h_d]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def scores(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-softmax attention logits ``[b, h, n, n]`` of ``x [b, n, d]`` (for inspection and tests)."""
        q, k, _ = self._qkv(x, positions)
        return q @ k.transpose(-1, -2) / self.head_dim**0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """``x [b, n, d]``, ``mask [b, n]`` (True = real frame), ``positions [b, n]`` → ``[b, n, d]``.

        Padded frames are never attended to; their own outputs are meaningless (callers zero them).
        """
        b, n, d = x.shape
        q, k, v = self._qkv(x, positions)
        attn_mask = None if mask is None else mask[:, None, None, :]  # [b, 1, 1, n]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)  # [b, h, n, h_d]
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """``LayerNorm → Linear → SiLU → dropout → Linear → dropout`` (the Conformer's FFN module)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim), nn.Dropout(dropout),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d]`` → ``[..., d]``."""
        return self.net(x)


class RotaryTransformerLayer(nn.Module):
    """Pre-norm Transformer layer: ``x + attn(norm(x))``, then ``x + ffn(x)``; padded frames zeroed."""

    def __init__(self, dim: int, n_heads: int, hidden_dim: int, dropout: float = 0.0,
                 rope_theta: float = 10_000.0) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = RotarySelfAttention(dim, n_heads, rope_theta, dropout)
        self.drop = nn.Dropout(dropout)
        self.ffn = FeedForward(dim, hidden_dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [b, n, d]``, ``mask [b, n]`` → ``[b, n, d]``."""
        x = x + self.drop(self.attn(self.attn_norm(x), mask))
        x = x + self.ffn(x)
        return x * mask[..., None]
