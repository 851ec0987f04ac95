"""Batching of encoded samples: right padding, attention mask, stacked images."""

from __future__ import annotations

from typing import Any

import torch

from mm_llama.data.examples import IGNORE_INDEX


def pad_text(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100).

    Args:
        batch: samples holding ``input_ids`` and ``labels``, each ``LongTensor[s_i]``.
        pad_id: padding id. It may equal a real token (SmolLM2 pads with
            ``<|im_end|>``), which is why padding is told apart by the mask and
            gets label -100, never by its id.

    Returns:
        ``input_ids [b, s]``, ``labels [b, s]``, ``attention_mask [b, s]`` (bool,
        True on real tokens), with ``s`` the longest sample.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(x["input_ids"]) for x in batch]
    b, s = len(batch), max(lengths)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)  # [b, s]
    labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)  # [b, s]
    attention_mask = torch.zeros((b, s), dtype=torch.bool)  # [b, s]
    for i, (x, n) in enumerate(zip(batch, lengths)):
        input_ids[i, :n] = x["input_ids"]
        labels[i, :n] = x["labels"]
        attention_mask[i, :n] = True
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Collate image samples from :func:`mm_llama.data.pipeline.build_dataset`.

    Args:
        batch: samples with ``input_ids``, ``labels`` (``LongTensor[s_i]``),
            ``image`` (``FloatTensor[3, H, W]``, all the same size) and ``meta`` (dict).
        pad_id: padding id for ``input_ids``.

    Returns:
        ``input_ids [b, s]``, ``labels [b, s]``, ``attention_mask [b, s]`` (bool),
        ``images [b, 3, H, W]`` (video samples: ``videos [b, f, 3, H, W]`` and
        ``frame_mask [b, f]`` instead) and ``meta`` (list of the samples' json dicts,
        with ``__key__``), for evaluation.
    """
    out: dict[str, Any] = pad_text(batch, pad_id)
    if "video" in batch[0]:  # video samples (mm_llama.data.video.VideoFrames)
        out["videos"] = torch.stack([x["video"] for x in batch])  # [b, f, 3, H, W]
        out["frame_mask"] = torch.stack([x["frame_mask"] for x in batch])  # [b, f]
    else:
        out["images"] = torch.stack([x["image"] for x in batch])  # [b, 3, H, W]
    out["meta"] = [x["meta"] for x in batch]
    return out
