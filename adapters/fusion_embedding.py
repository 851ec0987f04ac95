"""Trainable embeddings for new special tokens beside a frozen vocabulary.

The frozen LM's table keeps its ``v`` rows; ids ``v, v+1, ...`` (``<|image|>``,
``<|video|>``, ``<|speech|>``) index a small trainable table instead. No resize,
no copy of the frozen matrix (the "fusion embedding" of torchtune / Llama 3.2 Vision).
"""

from __future__ import annotations

import torch
from torch import nn

from mm_llama.static import must_stay_static


class FusionEmbedding(nn.Module):
    """Embed ids below ``base_vocab`` with the frozen table, the rest with a trainable one."""

    def __init__(self, base_vocab: int, n_new: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        if n_new <= 0:
            raise ValueError(f"FusionEmbedding needs at least one new token, got n_new={n_new}")
        self.base_vocab = base_vocab
        self.new = nn.Embedding(n_new, dim)
        nn.init.normal_(self.new.weight, std=init_std)

    def forward(self, ids: torch.Tensor, base: nn.Embedding) -> torch.Tensor:
        """``ids [b, s]`` → ``[b, s, d]``; ``base`` is the frozen LM's embedding."""
        is_new = ids >= self.base_vocab
        out = base(ids.clamp(max=self.base_vocab - 1))  # [b, s, d]
        # The test reads a device value on the host, which a CUDA graph cannot (mm_llama.static);
        # there both branches run.
        if must_stay_static(ids) or is_new.any():
            new = self.new((ids - self.base_vocab).clamp(min=0))  # [b, s, d]
            out = torch.where(is_new[..., None], new.to(out.dtype), out)
        return out
