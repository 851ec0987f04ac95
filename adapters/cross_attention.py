"""Gated cross-attention from text hidden states to media tokens (Llama 3 §7.2).

Shape legend: ``b`` batch, ``s`` text tokens, ``s_e`` media tokens, ``d`` LM width,
``h`` query heads, ``h_kv`` key/value heads, ``h_d`` head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.layers import RMSNorm, SwiGLU

ROW_MASK_MODES: tuple[str, ...] = ("both", "mlp_only")
"""How text rows that see no media are treated (see :class:`GatedCrossAttention`)."""


class GatedCrossAttention(nn.Module):
    """One gated cross-attention block, inserted between two frozen decoder blocks.

    ``h = h + tanh(g_attn) * s * attn(norm(h), media)``, then
    ``h = h + tanh(g_mlp) * s * mlp(norm(h))``, on text rows that can see media only.

    GQA with the LM's head layout, per-head RMSNorm on q and k, no RoPE (media
    tokens have no position in the text). ``s`` is ``output_scale``, a fixed
    (non-trainable) multiplier: with ``s`` set to the residual stream's typical
    RMS at this depth, an adapter output of unit size moves the frozen LM as much
    in layer 27 as in layer 3 (see benchmarks/RESULTS.md, "Learning dynamics"). The gates start at
    ``gate_init`` (0 by default), so at initialisation the block is the identity.

    ``row_mask_mode`` decides what happens to text rows that see no media (before the
    sample's first media token, or in a sample without media): ``"both"`` (default; Meta's
    reference and torchtune) zeroes the attention and the MLP output of such rows, so they
    pass through unchanged. ``"mlp_only"`` reproduces ``transformers``' Mllama: only the
    MLP output is zeroed, and the attention branch of such a row attends, unmasked, over
    all of its sample's media tokens (padding included) and is added through the gate.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        hidden_dim: int,
        *,
        norm_eps: float = 1e-5,
        gate_init: float = 0.0,
        output_scale: float = 1.0,
        row_mask_mode: str = "both",
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if row_mask_mode not in ROW_MASK_MODES:
            raise ValueError(f"row_mask_mode must be one of {ROW_MASK_MODES}, got {row_mask_mode!r}")
        self.row_mask_mode = row_mask_mode
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps)
        self.k_norm = RMSNorm(head_dim, norm_eps)
        self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, hidden_dim)
        self.mlp_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.register_buffer("output_scale", torch.tensor(float(output_scale)))

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``media [b, s_e, d]`` → each ``[b, h_kv, s_e, h_d]``.

        Separate from :meth:`forward` so that generation computes them once per request.
        """
        b, s_e, _ = media.shape
        k = self.k_proj(media).view(b, s_e, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [b, h_kv, s_e, h_d]
        v = self.v_proj(media).view(b, s_e, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [b, h_kv, s_e, h_d]
        return self.k_norm(k), v

    def forward(
        self,
        hidden: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        media_mask: torch.Tensor,
        row_mask: torch.Tensor,
        row_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Add gated cross-attention and MLP outputs to ``hidden``.

        Args:
            hidden: ``[b, s, d]`` residual stream of the frozen LM.
            kv: from :meth:`media_kv`, each ``[b, h_kv, s_e, h_d]``.
            media_mask: ``[b, s_e]`` bool, True for real (non-padding) media tokens, or
                ``[b, s, s_e]``: which of them each text row may see (packed rows,
                :mod:`mm_llama.packing`).
            row_mask: ``[b, s]`` bool, True for text rows that may see media (at or
                after the sample's media token). Other rows pass through unchanged,
                in both the attention and the MLP branch (``row_mask_mode="both"``), or
                get only the unmasked attention branch (``"mlp_only"``, see the class docstring).
            row_kv: optional per-row media, from :meth:`media_kv` of ``[b, s, d]`` tokens aligned
                with the text rows (each ``[b, h_kv, s, h_d]``): row ``j`` sees the media keys and
                its own row key ``j``, no other (``ModelConfig.prompt_reader`` with ``every_row``).

        Returns:
            ``[b, s, d]``.
        """
        b, s, _ = hidden.shape
        k, v = kv
        q = self.q_proj(self.attn_norm(hidden)).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        q = self.q_norm(q)  # [b, h, s, h_d]
        if media_mask.dim() == 2:
            media_mask = media_mask[:, None, :]  # [b, 1, s_e]: the same keys for every row
        # A row with no real media key would softmax over nothing (NaN); such rows are
        # zeroed by row_mask below, so letting them see all keys is harmless.
        keys_ok = media_mask | ~media_mask.any(dim=-1, keepdim=True)  # [b, 1 | s, s_e]
        if self.row_mask_mode == "both":
            attn_mask = keys_ok[:, None]  # [b, 1, 1 | s, s_e]
        else:  # a row seeing no real media token attends to every media token, unmasked
            row_mask = row_mask & media_mask.any(dim=-1)  # [b, s]
            attn_mask = (keys_ok | ~row_mask[:, :, None])[:, None]  # [b, 1, s, s_e]
        if row_kv is not None:
            if self.row_mask_mode != "both":
                raise ValueError('per-row media (row_kv) needs row_mask_mode="both"')
            # keys and values [b, h_kv, s_e + s, h_d]: the media's, then one per text row
            k, v = (torch.cat([m.expand(b, -1, -1, -1), r], dim=2) for m, r in zip(kv, row_kv))
            own = torch.eye(s, dtype=torch.bool, device=hidden.device).expand(b, 1, s, s)  # row j sees row key j
            attn_mask = torch.cat([attn_mask.expand(b, 1, s, -1), own], dim=-1)  # [b, 1, s, s_e + s]
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, enable_gqa=self.n_kv_heads != self.n_heads
        )  # [b, h, s, h_d]
        attn = self.o_proj(attn.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))  # [b, s, d]
        rows = row_mask[..., None].to(hidden.dtype)  # [b, s, 1]
        attn_rows = rows if self.row_mask_mode == "both" else 1.0
        scale = self.output_scale.to(hidden.dtype)
        hidden = hidden + torch.tanh(self.attn_gate) * scale * attn * attn_rows
        return hidden + torch.tanh(self.mlp_gate) * scale * self.mlp(self.mlp_norm(hidden)) * rows


def default_layer_positions(n_layers: int, every: int = 4) -> tuple[int, ...]:
    """Decoder-layer indices before which cross-attention sits: after every ``every`` blocks.

    For a 32-layer Llama and ``every=4`` this is ``(3, 7, ..., 31)``, the placement
    of Llama 3.2 Vision (one cross-attention layer per four self-attention layers).
    """
    if every <= 0:
        raise ValueError(f"cross-attention 'every' must be > 0, got {every}")
    return tuple(range(every - 1, n_layers, every))


def init_cross_attention_(module: GatedCrossAttention, std: float | None = None) -> None:
    """Normal init of the projections (std 1/sqrt(fan_in) by default); gates untouched."""
    for linear in (module.q_proj, module.k_proj, module.v_proj, module.o_proj, *module.mlp.children()):
        nn.init.normal_(linear.weight, std=std if std is not None else 1 / math.sqrt(linear.in_features))
