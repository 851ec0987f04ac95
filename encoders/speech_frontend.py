"""Speech front end: 16 kHz waveforms → normalised 80-dim log-mel features (Llama 3 §8.1).

25 ms Hann windows every 10 ms, power spectrum, HTK mel filterbank from
``torchaudio.functional.melscale_fbanks``, natural log, then per-utterance mean/variance
normalisation over the utterance's real frames. Frames are taken without centring
(``center=False``, Kaldi's ``snip_edges``): every frame lies inside the real signal,
so a zero-padded batch gives each utterance exactly the features it gets alone.
SpecAugment (``torchaudio.transforms.FrequencyMasking`` / ``TimeMasking``) applies in
training mode only.

Shape legend: ``b`` batch, ``n`` samples, ``t`` feature frames, ``m`` mel bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT
from torch import nn

from mm_llama.rotary_attention import frame_mask


@dataclass
class FrontEndConfig:
    """Log-mel features and SpecAugment.

    Attributes:
        sample_rate: input rate in Hz (the data pipeline resamples to it).
        n_mels: mel bins (paper: 80).
        win_ms: analysis window (paper: 25 ms).
        hop_ms: frame step (paper: 10 ms).
        freq_masks: SpecAugment frequency masks per utterance (0: none).
        freq_mask_width: widest frequency mask, in mel bins.
        time_masks: SpecAugment time masks per utterance (0: none).
        time_mask_width: widest time mask, in frames.
    """

    sample_rate: int = 16_000
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    freq_masks: int = 2
    freq_mask_width: int = 15
    time_masks: int = 2
    time_mask_width: int = 20

    def __post_init__(self) -> None:
        if self.n_mels < 1 or self.win_ms <= 0 or self.hop_ms <= 0:
            raise ValueError(f"need n_mels >= 1 and positive win_ms/hop_ms, got {self.n_mels}, "
                             f"{self.win_ms}, {self.hop_ms}")
        if min(self.freq_masks, self.time_masks, self.freq_mask_width, self.time_mask_width) < 0:
            raise ValueError("SpecAugment mask counts and widths must be >= 0")

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)


class LogMelFrontEnd(nn.Module):
    """``audio [b, n]`` + ``lengths [b]`` → features ``[b, t, m]`` + frame lengths ``[b]``."""

    def __init__(self, cfg: FrontEndConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or FrontEndConfig()
        self.register_buffer("window", torch.hann_window(cfg.win_length), persistent=False)
        fbanks = AF.melscale_fbanks(cfg.win_length // 2 + 1, 0.0, cfg.sample_rate / 2, cfg.n_mels, cfg.sample_rate,
                                    norm=None, mel_scale="htk")  # [f, m]
        self.register_buffer("fbanks", fbanks, persistent=False)
        self.freq_masking = AT.FrequencyMasking(cfg.freq_mask_width, iid_masks=True)
        self.time_masking = AT.TimeMasking(cfg.time_mask_width, iid_masks=True)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Feature frames of ``lengths [b]`` samples: ``1 + (n - win) // hop`` (0 when shorter than a window)."""
        win, hop = self.cfg.win_length, self.cfg.hop_length
        return torch.where(lengths >= win, (lengths - win) // hop + 1, torch.zeros_like(lengths))

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """Un-normalised log-mel ``[b, t, m]`` of ``audio [b, n]`` (``n >= win_length``)."""
        spec = torch.stft(audio.float(), n_fft=self.cfg.win_length, hop_length=self.cfg.hop_length,
                          window=self.window, center=False, return_complex=True)  # [b, f, t]
        mel = spec.abs().pow(2).transpose(1, 2) @ self.fbanks  # [b, t, m]
        return mel.clamp(min=1e-10).log()

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (and, in training, SpecAugmented) features; padded frames are 0.

        Args:
            audio: ``[b, n]`` zero-padded waveforms at ``cfg.sample_rate``.
            lengths: ``[b]`` real samples per utterance.

        Returns:
            ``features [b, t, m]`` and ``frames [b]`` (real frames per utterance, at least 1).
        """
        if audio.shape[1] < self.cfg.win_length:  # shorter than one window: pad to one frame
            audio = nn.functional.pad(audio, (0, self.cfg.win_length - audio.shape[1]))
        feats = self.log_mel(audio)  # [b, t, m]
        frames = self.frame_lengths(lengths).clamp(min=1, max=feats.shape[1])  # [b]
        mask = frame_mask(frames, feats.shape[1])[..., None]  # [b, t, 1]
        count = frames[:, None, None].to(feats.dtype)
        mean = (feats * mask).sum(1, keepdim=True) / count  # [b, 1, m]
        var = ((feats - mean).pow(2) * mask).sum(1, keepdim=True) / count
        feats = (feats - mean) * torch.rsqrt(var + 1e-5) * mask  # [b, t, m]
        if self.training:
            spec = feats.transpose(1, 2)  # [b, m, t], the layout torchaudio's masking expects
            for _ in range(self.cfg.freq_masks):
                spec = self.freq_masking(spec)
            for _ in range(self.cfg.time_masks):
                spec = self.time_masking(spec)
            feats = spec.transpose(1, 2) * mask
        return feats, frames
