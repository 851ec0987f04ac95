"""Perceiver-resampler temporal aggregator (Llama 3 §7.2, video adapter).

Shape legend: ``b`` batch, ``f`` frames, ``s_f`` tokens per frame, ``d_e`` encoder width,
``k`` frames merged per group, ``g = ceil(f / k)`` groups, ``n_l`` latents per group,
``h`` heads, ``h_d`` head width.

Every ``k`` consecutive frames are merged into ``n_l`` tokens: learned latent queries
cross-attend to the group's frame tokens (plus themselves, as in Flamingo's resampler),
then an MLP, for ``depth`` layers. A frame-position embedding (which of the ``k``
frames a token came from) is what lets the latents encode *order* within a group; a
group-position embedding on the output does the same across groups, because the
cross-attention that reads the result has no positions of its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverLayer(nn.Module):
    """Latents attend to ``[media; latents]``, then a GELU MLP; both pre-norm, residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"aggregator width {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.media_norm = nn.LayerNorm(dim)
        self.latent_norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, latents: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor) -> torch.Tensor:
        """``latents [n, n_l, d_e]`` read ``media [n, m, d_e]`` (``media_mask [n, m]``, True = real).

        Returns:
            ``[n, n_l, d_e]``.
        """
        n, n_l, d = latents.shape
        h_d = d // self.heads
        lat = self.latent_norm(latents)
        source = torch.cat([self.media_norm(media), lat], dim=1)  # [n, m + n_l, d_e]
        keep = torch.cat([media_mask, media_mask.new_ones(n, n_l)], dim=1)  # [n, m + n_l]: latents always visible
        q = self.q_proj(lat).view(n, n_l, self.heads, h_d).transpose(1, 2)  # [n, h, n_l, h_d]
        k, v = self.kv_proj(source).view(n, -1, 2, self.heads, h_d).permute(2, 0, 3, 1, 4).unbind(0)  # [n, h, m+n_l, h_d]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # [n, h, n_l, h_d]
        latents = latents + self.o_proj(attn.transpose(1, 2).reshape(n, n_l, d))
        return latents + self.mlp(self.mlp_norm(latents))


class TemporalAggregator(nn.Module):
    """Merge every ``k`` consecutive frames' tokens into ``n_l`` latent tokens.

    Args:
        dim: ``d_e``, width of the frame tokens (kept: the output has the same width).
        frames_per_group: ``k`` (Llama 3: 16 at video pre-training, 32 at SFT).
        n_latents: ``n_l`` output tokens per group (Llama 3: as many as one frame has,
            so that "32 frames are merged into one").
        max_groups: most groups a clip may have (size of the group-position table).
        depth: perceiver layers.
        heads: attention heads.
    """

    def __init__(self, dim: int, frames_per_group: int, n_latents: int, max_groups: int,
                 depth: int = 2, heads: int = 8) -> None:
        super().__init__()
        for name, value in (("frames_per_group", frames_per_group), ("n_latents", n_latents),
                            ("max_groups", max_groups), ("depth", depth)):
            if value < 1:
                raise ValueError(f"TemporalAggregator {name} must be >= 1, got {value}")
        self.k, self.n_latents, self.max_groups = frames_per_group, n_latents, max_groups
        self.input_norm = nn.LayerNorm(dim)
        self.latents = nn.Parameter(torch.randn(n_latents, dim) / math.sqrt(dim))
        # Unit-variance positions on unit-variance (layer-normed) features: order is as visible
        # to the latents as content is, from the first step.
        self.frame_pos = nn.Parameter(torch.randn(frames_per_group, dim))
        self.group_pos = nn.Parameter(torch.randn(max_groups, dim) / math.sqrt(dim))
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads) for _ in range(depth))
        self.out_norm = nn.LayerNorm(dim)

    def groups(self, n_frames: int) -> int:
        """``g``: groups of a clip of ``n_frames`` frames (the last one padded)."""
        return math.ceil(n_frames / self.k)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate a batch of clips.

        Args:
            frames: ``[b, f, s_f, d_e]`` per-frame encoder tokens.
            frame_mask: ``[b, f]`` bool, True on real frames (padding frames are never read).

        Returns:
            Tokens ``[b, g * n_l, d_e]`` (group-major) and their mask ``[b, g * n_l]``:
            a group's tokens are masked out when it has no real frame. ``f`` need not be
            a multiple of ``k``: the last group is padded with masked frames.
        """
        b, f, s_f, d = frames.shape
        if frame_mask.shape != (b, f):
            raise ValueError(f"frame_mask must be [b, f] = {(b, f)}, got {tuple(frame_mask.shape)}")
        g = self.groups(f)
        if g > self.max_groups:
            raise ValueError(f"{f} frames make {g} groups of {self.k}, more than max_groups={self.max_groups}")
        pad = g * self.k - f
        x = self.input_norm(frames)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))  # [b, g * k, s_f, d_e]
            frame_mask = F.pad(frame_mask, (0, pad), value=False)  # [b, g * k]
        x = x.view(b, g, self.k, s_f, d) + self.frame_pos[None, None, :, None, :]  # [b, g, k, s_f, d_e]
        x = x.reshape(b * g, self.k * s_f, d)  # [b * g, k * s_f, d_e]
        group_frames = frame_mask.view(b, g, self.k)  # [b, g, k]
        key_mask = group_frames.repeat_interleave(s_f, dim=2).reshape(b * g, self.k * s_f)  # [b * g, k * s_f]
        latents = self.latents.expand(b * g, -1, -1)  # [b * g, n_l, d_e]
        for layer in self.layers:
            latents = layer(latents, x, key_mask)
        out = self.out_norm(latents).view(b, g, self.n_latents, d) + self.group_pos[None, :g, None, :]  # [b, g, n_l, d_e]
        mask = group_frames.any(dim=2)[:, :, None].expand(b, g, self.n_latents)  # [b, g, n_l]
        return out.reshape(b, g * self.n_latents, d), mask.reshape(b, g * self.n_latents)
