"""Embedding fusion (Llama 3 §8.1): speech frames take the place of ``<|speech|>`` in the LM input.

A text sequence holds one ``<|speech|>`` placeholder; utterance ``i`` has ``L_i`` adapter
frames. :func:`splice_speech` builds, per sample, ``text[:p] + frames[:L_i] + text[p+1:]``,
so sequences grow by ``L_i - 1`` positions and by different amounts per sample. It
re-pads the batch (right for training, left for generation), renumbers RoPE positions
from 0 over the real positions, and gives labels ``-100`` to every speech frame and pad.

Shape legend: ``b`` batch, ``s`` text tokens, ``s_e`` speech frames, ``s'`` spliced length,
``d`` LM width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_llama.data.examples import IGNORE_INDEX


@dataclass
class SplicedInputs:
    """The LM's input after splicing.

    Attributes:
        embeds: ``[b, s', d]`` input embeddings.
        key_padding_mask: ``[b, s']`` bool, True on real positions (text and speech).
        positions: ``[b, s']`` RoPE positions, ``0..n_i-1`` over sample ``i``'s real positions
            (pads: 0).
        labels: ``[b, s']`` or ``None`` when no labels were given.
        speech_mask: ``[b, s']`` bool, True on the speech frames.
    """

    embeds: torch.Tensor
    key_padding_mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor | None
    speech_mask: torch.Tensor


def splice_speech(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    placeholder_id: int,
    speech: torch.Tensor,
    speech_mask: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    left_pad: bool = False,
) -> SplicedInputs:
    """Replace each sample's ``<|speech|>`` embedding by its real speech frames.

    Args:
        embeds: ``[b, s, d]`` embeddings of ``input_ids``.
        input_ids: ``[b, s]``; each sample holds ``placeholder_id`` exactly once among its real tokens.
        placeholder_id: id of ``<|speech|>``.
        speech: ``[b, s_e, d]`` adapter output.
        speech_mask: ``[b, s_e]`` bool, True on real frames (a prefix of each row).
        attention_mask: ``[b, s]`` bool, True on real tokens (any padding side); ``None``: all real.
        labels: ``[b, s]`` or ``None``.
        left_pad: pad the spliced batch on the left (generation) instead of the right.

    Raises:
        ValueError: a sample without exactly one placeholder.
    """
    b, s, d = embeds.shape
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    pieces: list[tuple[torch.Tensor, torch.Tensor | None, int, int]] = []  # (embeds, labels, p, L)
    for i in range(b):
        idx = real[i].nonzero().squeeze(1)  # positions of real tokens
        ids_i = input_ids[i, idx]
        where = (ids_i == placeholder_id).nonzero().squeeze(1)
        if where.numel() != 1:
            raise ValueError(f"sample {i} has {where.numel()} <|speech|> placeholders (id {placeholder_id}); "
                             "embedding fusion needs exactly one")
        p, n_frames = int(where), int(speech_mask[i].sum())
        row = torch.cat([embeds[i, idx[:p]], speech[i, :n_frames].to(embeds.dtype), embeds[i, idx[p + 1:]]])
        row_labels = None
        if labels is not None:
            lab = labels[i, idx]
            row_labels = torch.cat([lab[:p], lab.new_full((n_frames,), IGNORE_INDEX), lab[p + 1:]])
        pieces.append((row, row_labels, p, n_frames))
    width = max(len(row) for row, *_ in pieces)
    out = embeds.new_zeros(b, width, d)  # [b, s', d]
    key_mask = torch.zeros(b, width, dtype=torch.bool, device=embeds.device)
    positions = torch.zeros(b, width, dtype=torch.long, device=embeds.device)
    speech_rows = torch.zeros(b, width, dtype=torch.bool, device=embeds.device)
    out_labels = None if labels is None else labels.new_full((b, width), IGNORE_INDEX)
    for i, (row, row_labels, p, n_frames) in enumerate(pieces):
        n = len(row)
        start = width - n if left_pad else 0
        out[i, start:start + n] = row
        key_mask[i, start:start + n] = True
        positions[i, start:start + n] = torch.arange(n, device=embeds.device)
        speech_rows[i, start + p:start + p + n_frames] = True
        if out_labels is not None:
            out_labels[i, start:start + n] = row_labels
    return SplicedInputs(out, key_mask, positions, out_labels, speech_rows)
