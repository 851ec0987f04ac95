"""The one interface every media encoder (image, video, speech) implements.

Adapters consume :class:`EncoderOutput` and nothing else, so an encoder can be
swapped without touching the fusion code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class EncoderOutput:
    """Media tokens plus a padding mask.

    Attributes:
        tokens: ``[b, s_e, d_e]`` encoder features.
        mask: ``[b, s_e]`` bool, ``True`` = real token, ``False`` = padding.
    """

    tokens: Tensor  # [b, s_e, d_e]
    mask: Tensor  # [b, s_e] bool, True = real token

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"EncoderOutput.tokens must be [b, s_e, d_e], got shape {tuple(self.tokens.shape)}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"EncoderOutput.mask must be bool, got {self.mask.dtype}")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"EncoderOutput.mask shape {tuple(self.mask.shape)} does not match "
                f"tokens [b, s_e] = {tuple(self.tokens.shape[:2])}"
            )


class MediaEncoder(nn.Module, ABC):
    """Base class of image, video and speech encoders.

    Attributes:
        out_dim: ``d_e``, the feature width of :attr:`EncoderOutput.tokens`.
    """

    out_dim: int

    @abstractmethod
    def forward(self, *args: Tensor) -> EncoderOutput:
        """Encode one batch of media into tokens ``[b, s_e, d_e]`` and a mask ``[b, s_e]``."""

    @abstractmethod
    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute block activations in the backward pass instead of storing them."""

    def trains(self) -> bool:
        """Whether any of this encoder's parameters requires a gradient (a frozen one keeps
        nothing for backward, so there is nothing to recompute)."""
        return any(p.requires_grad for p in self.parameters())

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The repeated blocks (transformer or Conformer layers), input side first.

        What activation checkpointing recomputes, and what FSDP shards one at a time
        (:mod:`mm_llama.training.scale`): an encoder of the paper's size (ViT-H/14, 40 blocks)
        is then never gathered whole.
        """
