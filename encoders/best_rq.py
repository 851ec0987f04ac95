"""BEST-RQ self-supervised pre-training of the speech encoder (Chiu et al. 2022; Llama 3 §8.1).

A frozen *random-projection quantizer* turns each 40 ms group of stacked, normalised
log-mel frames into one discrete label per codebook: project with a random matrix,
l2-normalise, take the nearest of a random, l2-normalised codebook. Spans of the input
are replaced by noise, and the encoder learns to predict the labels of the masked
frames (cross-entropy, one softmax per codebook). Nothing about the quantizer is
trained, so the targets can never collapse.

Shape legend: ``b`` batch, ``t`` 10 ms frames, ``m`` mel bins, ``n`` 40 ms frames,
``c`` codebooks, ``k`` codebook size, ``d_e`` encoder width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.conformer import stack_frames
from encoders.speech import SpeechEncoder
from mm_llama.rotary_attention import frame_mask


@dataclass
class BestRQConfig:
    """Quantizer and masking.

    Attributes:
        codebooks: independent codebooks ``c``, each with its own projection and softmax head.
        codebook_size: entries ``k`` per codebook.
        codebook_dim: projection width.
        mask_prob: probability that a 40 ms frame starts a masked span.
        mask_span: span length in 40 ms frames (400 ms by default).
        noise_std: masked input frames are replaced by ``N(0, noise_std²)`` (features are normalised).
        seed: seeds the projection and the codebooks (saved with the model as buffers anyway).
    """

    codebooks: int = 4
    codebook_size: int = 1024
    codebook_dim: int = 16
    mask_prob: float = 0.02
    mask_span: int = 10
    noise_std: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.codebooks, self.codebook_size, self.codebook_dim, self.mask_span) < 1:
            raise ValueError("BestRQConfig codebooks, codebook_size, codebook_dim and mask_span must be >= 1")
        if not 0 < self.mask_prob <= 1:
            raise ValueError(f"mask_prob must be in (0, 1], got {self.mask_prob}")


class RandomProjectionQuantizer(nn.Module):
    """Stacked features ``[b, n, f]`` → labels ``[b, n, c]`` (frozen: buffers, no parameters)."""

    def __init__(self, in_dim: int, cfg: BestRQConfig) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed)
        xavier_std = (2 / (in_dim + cfg.codebook_dim)) ** 0.5
        projection = torch.randn(cfg.codebooks, in_dim, cfg.codebook_dim, generator=g) * xavier_std
        codebooks = F.normalize(torch.randn(cfg.codebooks, cfg.codebook_size, cfg.codebook_dim, generator=g), dim=-1)
        self.register_buffer("projection", projection)  # [c, f, dim], Xavier-normal
        self.register_buffer("codebooks", codebooks)  # [c, k, dim], unit rows

    @torch.no_grad()
    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        z = F.normalize(torch.einsum("bnf,cfe->bnce", stacked, self.projection), dim=-1)  # [b, n, c, dim]
        return torch.einsum("bnce,cke->bnck", z, self.codebooks).argmax(-1)  # nearest unit vector = max cosine


def span_mask(lengths: torch.Tensor, n: int, prob: float, span: int, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """``[b, n]`` bool: spans of ``span`` frames starting with probability ``prob`` at each real frame,
    clipped to the real frames; every utterance gets at least one span (from a random real frame)."""
    b = lengths.shape[0]
    real = frame_mask(lengths, n)
    starts = (torch.rand(b, n, generator=generator) < prob) & real
    none = ~starts.any(1)
    if none.any():
        pick = (torch.rand(b, generator=generator) * lengths).long().clamp(max=n - 1)
        starts[none, pick[none]] = True
    mask = torch.zeros_like(starts)
    for offset in range(span):  # a frame is masked if a span started within the last `span` frames
        mask[:, offset:] |= starts[:, : n - offset]
    return mask & real


class BestRQ(nn.Module):
    """A :class:`~encoders.speech.SpeechEncoder` plus the quantizer and one linear head per codebook."""

    def __init__(self, encoder: SpeechEncoder, cfg: BestRQConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or BestRQConfig()
        self.encoder = encoder
        ecfg = encoder.cfg
        self.quantizer = RandomProjectionQuantizer(ecfg.frontend.n_mels * ecfg.stack, cfg)
        self.head = nn.Linear(encoder.out_dim, cfg.codebooks * cfg.codebook_size)

    def train(self, mode: bool = True) -> BestRQ:
        super().train(mode)
        self.encoder.frontend.eval()  # the masking replaces SpecAugment; targets must see clean features
        return self

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
        """``audio [b, n_samples]`` → ``loss``, ``accuracy`` (masked frames, all codebooks) and the ``mask [b, n]``."""
        enc, stride = self.encoder, self.encoder.cfg.stack
        feats, frames = enc.frontend(audio, lengths)  # [b, t, m], [b]
        targets = self.quantizer(stack_frames(feats, stride))  # [b, n, c]
        n_lengths = enc.stacking.output_lengths(frames)
        mask = span_mask(n_lengths, targets.shape[1], self.cfg.mask_prob, self.cfg.mask_span, generator)  # [b, n]
        frame_masked = mask.repeat_interleave(stride, dim=1)[:, : feats.shape[1], None]  # [b, t, 1]
        noise = torch.randn(feats.shape, generator=generator).to(feats) * self.cfg.noise_std
        feats = torch.where(frame_masked, noise, feats) * frame_mask(frames, feats.shape[1])[..., None]
        x, n_lengths = enc.stacking(feats, frames)
        hidden = enc.backbone(x, n_lengths)  # [b, n, d_e]
        logits = self.head(hidden[mask]).view(-1, self.cfg.codebooks, self.cfg.codebook_size)  # [masked, c, k]
        picked = targets[mask]  # [masked, c]
        loss = F.cross_entropy(logits.flatten(0, 1), picked.flatten())
        accuracy = (logits.argmax(-1) == picked).float().mean()
        return {"loss": loss, "accuracy": accuracy, "mask": mask}
