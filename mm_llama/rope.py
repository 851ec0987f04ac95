"""Rotary position embedding (RoPE) with the Llama 3.1 ``llama3`` frequency scaling."""

from __future__ import annotations

import math

import torch

from mm_llama.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies ``[h_d / 2]`` (fp64 internally, returned fp32).

    With ``scaling`` the Llama 3.1 rule applies: low-frequency components
    (wavelength above ``original / low_freq_factor``) are slowed by ``factor``,
    high-frequency ones are kept, and the band between is linearly blended in
    the smoothing variable ``original / wavelength``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(in_band, blended, scaled).float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions [b, s]`` → each ``[b, 1, s, h_d]`` (rotate-half layout)."""
    angles = positions[..., None].float() * inv_freq  # [b, s, h_d/2]
    angles = torch.cat((angles, angles), dim=-1)  # [b, s, h_d]
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [b, h, s, h_d]`` by the tables of :func:`rope_cos_sin`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
