"""Speech adapter (Llama 3 §8.1): conv (kernel 3, stride 2 → 80 ms frames), one rotary
Transformer layer, linear map to the LM's width.

Its output feeds the frozen LM in one of two ways (:data:`SPEECH_FUSIONS`), see
:mod:`adapters.speech_fusion`:

* ``"embedding"`` (the paper): the frames replace the ``<|speech|>`` placeholder in the
  LM's input sequence;
* ``"cross_attention"`` (the design card): the frames are the K/V source of the gated
  cross-attention blocks, as image tokens are.

Shape legend: ``b`` batch, ``n`` encoder frames (40 ms), ``s_e`` adapter frames (80 ms),
``d_e`` encoder width, ``d_a`` adapter width, ``d`` LM width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mm_llama.layers import RMSNorm
from mm_llama.rotary_attention import RotaryTransformerLayer, frame_mask

SPEECH_FUSIONS = ("embedding", "cross_attention")


@dataclass
class SpeechAdapterConfig:
    """Speech adapter shape and fusion mode.

    Attributes:
        fusion: ``"embedding"`` or ``"cross_attention"`` (:data:`SPEECH_FUSIONS`).
        dim: width of the conv and Transformer layer (paper: 3072; CPU default 256).
        heads: attention heads of the Transformer layer.
        ffn_dim: its FFN width (paper: 4096).
        dropout: dropout in the Transformer layer.
        checkpoint: a state dict (``.pt``) of the adapter to load, e.g. from the token-CTC
            stage (:mod:`mm_llama.training.ctc_pretrain`); ``None``: random initialisation.
    """

    fusion: str = "embedding"
    dim: int = 256
    heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.fusion not in SPEECH_FUSIONS:
            raise ValueError(f"speech fusion must be one of {SPEECH_FUSIONS}, got {self.fusion!r}")
        if self.dim % self.heads:
            raise ValueError(f"adapter dim ({self.dim}) must be a multiple of heads ({self.heads})")


class SpeechAdapter(nn.Module):
    """Encoder tokens ``[b, n, d_e]`` → LM-width speech frames ``[b, s_e, d]``, ``s_e = ceil(n / 2)``.

    Args:
        in_dim: encoder width ``d_e``.
        out_dim: LM width ``d``.
        cfg: shape.
        output_rms: initial RMS of the output (the weight of its final RMSNorm). For embedding
            fusion, the frozen embedding table's typical RMS, so the speech frames start at the
            scale of the token embeddings they sit among; 1 for cross-attention K/V.
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: SpeechAdapterConfig | None = None,
                 output_rms: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SpeechAdapterConfig()
        self.conv = nn.Conv1d(in_dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        self.layer = RotaryTransformerLayer(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.dropout)
        self.proj = nn.Linear(cfg.dim, out_dim)
        self.norm = RMSNorm(out_dim)
        nn.init.constant_(self.norm.weight, output_rms)
        if cfg.checkpoint is not None:
            self.load_state_dict(torch.load(cfg.checkpoint, map_location="cpu", weights_only=True), strict=True)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Frames out of ``lengths [b]`` frames in (kernel 3, stride 2, padding 1): ``ceil(n / 2)``."""
        return (lengths - 1) // 2 + 1

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [b, n, d_e]``, ``mask [b, n]`` → ``[b, s_e, d]`` and ``mask [b, s_e]``."""
        x = tokens * mask[..., None].to(tokens.dtype)  # padding enters the conv as its own zero padding
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # [b, s_e, d_a]
        out_mask = frame_mask(self.output_lengths(mask.sum(1)), x.shape[1])  # [b, s_e]
        x = self.layer(x, out_mask)  # [b, s_e, d_a]
        return self.norm(self.proj(x)) * out_mask[..., None], out_mask
