"""The video branch of :class:`~mm_llama.model.MultimodalLlama` (Llama 3 §7.2, §7.4).

Shape legend: ``b`` batch, ``f`` frames, ``s_f`` tokens per frame, ``d_e`` encoder width,
``d`` LM width, ``g`` frame groups, ``n_l`` latents per group.

Frames go through the image encoder one by one (``[b * f, 3, H, W]``). Two things read them:

* the image cross-attention blocks, which see the frames' tokens as one unordered set
  (cross-attention has no positions), exactly as the image model sees an image;
* the video branch built here: a :class:`~adapters.temporal.TemporalAggregator` merges
  every ``k`` consecutive frames, a projection maps the result to the LM's width, and
  gated cross-attention blocks placed *before* every ``every``-th image cross-attention
  block read it. These are the only parts that know the frames' order.

Video blocks start with their gates at 0 (like the image ones), so a video model built
from trained image weights starts as exactly the image model; video pre-training then
trains only this branch (:data:`VIDEO_GROUPS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import safetensors.torch
import torch
from torch import nn

from adapters import GatedCrossAttention, MediaProjection
from adapters.cross_attention import init_cross_attention_
from adapters.temporal import TemporalAggregator
from mm_llama.config import LlamaConfig

VIDEO_GROUPS: tuple[str, ...] = ("temporal_aggregator", "video_projection", "video_cross_attention")
"""Trainable groups of the video branch: what video pre-training trains (and nothing else)."""


@dataclass
class VideoConfig:
    """The video branch. The defaults are CPU-sized; Llama 3 pre-trains with
    ``frames=16, frames_per_group=16`` and fine-tunes with ``frames=64, frames_per_group=32``.

    Attributes:
        frames: ``f``, frames sampled uniformly over each clip.
        frames_per_group: ``k``, consecutive frames the aggregator merges into one group.
        latents: ``n_l`` tokens per group; ``None``: as many as one frame has.
        depth: perceiver layers of the aggregator.
        heads: attention heads of the aggregator (must divide the encoder width).
        every: a video cross-attention block before every ``every``-th image cross-attention
            block, counting from the first (Llama 3: 4).
        hidden_dim: MLP width of the video blocks; ``None`` uses the LM's.
        gate_init: initial value of their tanh gates; 0 keeps the model equal to the image model.
        aggregator_checkpoint: a ``.safetensors`` state dict of the temporal aggregator (from
            the clip-caption pre-training stage, :mod:`mm_llama.training.encoder_pretrain`),
            loaded strictly when the branch is built; ``None``: random initialisation.
    """

    frames: int = 8
    frames_per_group: int = 4
    latents: int | None = None
    depth: int = 2
    heads: int = 8
    every: int = 4
    hidden_dim: int | None = None
    gate_init: float = 0.0
    aggregator_checkpoint: str | None = None

    def __post_init__(self) -> None:
        for name in ("frames", "frames_per_group", "depth", "heads", "every"):
            if getattr(self, name) < 1:
                raise ValueError(f"VideoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.latents is not None and self.latents < 1:
            raise ValueError(f"VideoConfig.latents must be None or >= 1, got {self.latents}")


def video_layer_positions(image_positions: tuple[int, ...], every: int) -> tuple[int, ...]:
    """LM layers of the video blocks: those of image blocks ``0, every, 2 * every, ...``.

    A video block keyed by layer ``i`` runs just before the image block of layer ``i``.
    For SmolLM2's 30 layers (image blocks before 3, 7, ..., 27) and ``every=4`` this is ``(3, 19)``.
    """
    return tuple(sorted(image_positions))[::every]


def build_aggregator(cfg: VideoConfig, encoder_dim: int, tokens_per_frame: int) -> TemporalAggregator:
    """The branch's :class:`~adapters.temporal.TemporalAggregator` over ``encoder_dim``-wide frame tokens,
    with ``cfg.aggregator_checkpoint`` loaded when set."""
    aggregator = TemporalAggregator(
        encoder_dim, cfg.frames_per_group, cfg.latents or tokens_per_frame,
        max_groups=-(-cfg.frames // cfg.frames_per_group), depth=cfg.depth, heads=cfg.heads,
    )
    if cfg.aggregator_checkpoint is not None:
        aggregator.load_state_dict(safetensors.torch.load_file(cfg.aggregator_checkpoint), strict=True)
    return aggregator


class VideoAdapter(nn.Module):
    """Temporal aggregator + projection + video cross-attention blocks.

    Args:
        cfg: the branch's configuration.
        encoder_dim: ``d_e`` of the image encoder.
        tokens_per_frame: ``s_f`` of the image encoder.
        lm_cfg: the frozen LM's configuration (width, heads).
        image_positions: LM layers of the image cross-attention blocks.
        output_scales: fixed output scale per LM layer (the image blocks' ``residual_rms``).
    """

    def __init__(self, cfg: VideoConfig, encoder_dim: int, tokens_per_frame: int, lm_cfg: LlamaConfig,
                 image_positions: tuple[int, ...], output_scales: dict[int, float]) -> None:
        super().__init__()
        self.cfg = cfg
        self.aggregator = build_aggregator(cfg, encoder_dim, tokens_per_frame)
        self.projection = MediaProjection(encoder_dim, lm_cfg.dim, lm_cfg.norm_eps)
        self.cross_attn = nn.ModuleDict()
        for i in video_layer_positions(image_positions, cfg.every):
            block = GatedCrossAttention(
                lm_cfg.dim, lm_cfg.n_heads, lm_cfg.n_kv_heads, lm_cfg.resolved_head_dim,
                cfg.hidden_dim or lm_cfg.hidden_dim, norm_eps=lm_cfg.norm_eps,
                gate_init=cfg.gate_init, output_scale=output_scales.get(i, 1.0),
            )
            init_cross_attention_(block)
            self.cross_attn[str(i)] = block

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames [b, f, s_f, d_e]`` (``frame_mask [b, f]``) → video tokens ``[b, g * n_l, d]`` and mask."""
        tokens, mask = self.aggregator(frames, frame_mask)  # [b, g * n_l, d_e], [b, g * n_l]
        return self.projection(tokens), mask

    def media_kv(self, tokens: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each video block's K/V of ``tokens [b, g * n_l, d]`` (each ``[b, h_kv, g * n_l, h_d]``)."""
        return {int(i): blk.media_kv(tokens) for i, blk in self.cross_attn.items()}
