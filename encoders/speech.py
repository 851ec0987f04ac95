"""Speech encoder: log-mel front end → stride-4 stacking → Conformer layers (Llama 3 §8.1).

Backbones by name (:data:`SPEECH_BACKBONES`):

* ``"conformer"``: ours, with rotary self-attention and padding masks throughout
  (:mod:`encoders.conformer`);
* ``"torchaudio_conformer"``: ``torchaudio.models.Conformer`` as a baseline (plain
  ``nn.MultiheadAttention`` without positions, BatchNorm in its convolution module), behind
  the same front end and stacking layer.

Shape legend: ``b`` batch, ``n`` samples, ``t`` 10 ms frames, ``s_e`` 40 ms encoder frames,
``d_e`` encoder width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torchaudio
from torch import nn

from encoders.base import EncoderOutput, MediaEncoder
from encoders.conformer import ConformerLayer, FrameStacking
from encoders.speech_frontend import FrontEndConfig, LogMelFrontEnd
from mm_llama.recompute import call_block
from mm_llama.rotary_attention import frame_mask


@dataclass
class SpeechEncoderConfig:
    """The speech encoder's shape (defaults: CPU-sized; :meth:`paper` gives the ~1B one).

    Attributes:
        backbone: a key of :data:`SPEECH_BACKBONES`.
        dim: Conformer width ``d_e`` (paper: 1536).
        depth: Conformer layers (paper: 24).
        heads: attention heads (paper: 24).
        ffn_dim: hidden width of each macaron FFN (paper: 4096).
        conv_kernel: depthwise convolution kernel (paper: 7).
        stack: frames stacked by the subsampling layer (paper: 4, i.e. 40 ms frames).
        dropout: dropout inside the layers.
        rope_theta: rotary base.
        frontend: log-mel and SpecAugment settings.
        checkpoint: a state dict (``.pt``) to load, e.g. from BEST-RQ pre-training.
    """

    backbone: str = "conformer"
    dim: int = 144
    depth: int = 4
    heads: int = 4
    ffn_dim: int = 576
    conv_kernel: int = 7
    stack: int = 4
    dropout: float = 0.1
    rope_theta: float = 10_000.0
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.backbone not in SPEECH_BACKBONES:
            raise ValueError(f"unknown speech backbone {self.backbone!r}; known: {sorted(SPEECH_BACKBONES)}")
        if min(self.dim, self.depth, self.heads, self.ffn_dim, self.stack) < 1:
            raise ValueError("SpeechEncoderConfig dim, depth, heads, ffn_dim and stack must be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def paper(cls) -> SpeechEncoderConfig:
        """Llama 3's ~1B-parameter Conformer: 24 layers, width 1536, FFN 4096, 24 heads."""
        return cls(dim=1536, depth=24, heads=24, ffn_dim=4096)


class _RotaryConformer(nn.Module):
    def __init__(self, cfg: SpeechEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ConformerLayer(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.conv_kernel, cfg.dropout, cfg.rope_theta)
            for _ in range(cfg.depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = frame_mask(lengths, x.shape[1])  # [b, s_e]
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = call_block(layer, x, mask, recompute=recompute)
        return x


class _TorchaudioConformer(nn.Module):
    def __init__(self, cfg: SpeechEncoderConfig) -> None:
        super().__init__()
        self.conformer = torchaudio.models.Conformer(
            input_dim=cfg.dim, num_heads=cfg.heads, ffn_dim=cfg.ffn_dim, num_layers=cfg.depth,
            depthwise_conv_kernel_size=cfg.conv_kernel, dropout=cfg.dropout,
        )  # fmt: skip
        self.grad_checkpointing = False

    @property
    def layers(self) -> nn.ModuleList:
        return self.conformer.conformer_layers

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``torchaudio.models.Conformer.forward``'s loop (time-major layers, True = padding),
        each layer recomputed in backward when asked: its BatchNorm still counts a batch once."""
        mask = frame_mask(lengths, x.shape[1])  # [b, s_e]
        padding = ~mask  # torchaudio's key padding mask
        h = x.transpose(0, 1)  # [s_e, b, d_e]
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            h = call_block(layer, h, padding, recompute=recompute)
        return h.transpose(0, 1) * mask[..., None]


SPEECH_BACKBONES: dict[str, Callable[[SpeechEncoderConfig], nn.Module]] = {
    "conformer": _RotaryConformer,
    "torchaudio_conformer": _TorchaudioConformer,
}
"""Conformer stacks by name: ``(config) -> module(x [b, s_e, d_e], lengths [b]) -> [b, s_e, d_e]``."""


class SpeechEncoder(MediaEncoder):
    """``audio [b, n]`` 16 kHz + ``lengths [b]`` → tokens ``[b, s_e, d_e]`` (40 ms frames) + mask."""

    def __init__(self, cfg: SpeechEncoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SpeechEncoderConfig()
        self.frontend = LogMelFrontEnd(cfg.frontend)
        self.stacking = FrameStacking(cfg.frontend.n_mels, cfg.dim, cfg.stack)
        self.backbone = SPEECH_BACKBONES[cfg.backbone](cfg)
        self.out_dim = cfg.dim
        if cfg.checkpoint is not None:
            self.load_state_dict(torch.load(cfg.checkpoint, map_location="cpu", weights_only=True))

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.backbone.grad_checkpointing = enabled

    def blocks(self) -> list[nn.Module]:
        """The Conformer's layers (ours or torchaudio's; a torchaudio layer's BatchNorm counts each
        batch once when the layer is recomputed, :mod:`mm_llama.recompute`)."""
        return list(self.backbone.layers)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames of ``lengths [b]`` samples."""
        frames = self.frontend.frame_lengths(lengths).clamp(min=1)
        return self.stacking.output_lengths(frames)

    def features(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked, projected features before the Conformer: ``[b, s_e, d_e]``, ``[b]``."""
        feats, frames = self.frontend(audio, lengths)  # [b, t, m], [b]
        return self.stacking(feats, frames)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """Encode ``audio [b, n]`` (zero-padded) of ``lengths [b]`` real samples."""
        x, n = self.features(audio, lengths)  # [b, s_e, d_e], [b]
        return EncoderOutput(self.backbone(x, n), frame_mask(n, x.shape[1]))
