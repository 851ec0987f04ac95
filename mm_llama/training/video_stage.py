"""Video pre-training (Llama 3 §7.4): start from the image stage's weights, train only the video branch.

* :func:`video_stage_config` turns an image-stage checkpoint's model configuration into the
  video stage's: the same encoder and image adapters, a video branch, and
  ``trainable = VIDEO_GROUPS``.
* :func:`load_stage_weights` loads that checkpoint's trained weights into the new model; the
  only weights it may lack are the video branch's, which keep their initialisation (gates 0).
* :func:`check_video_stage_trainable` asserts the trainable set: every video-branch
  parameter and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from mm_llama.checkpoint_files import checkpoint_read_errors
from mm_llama.model import MEDIA_TOKENS, ModelConfig, MultimodalLlama, without_weight_files
from mm_llama.video_adapter import VIDEO_GROUPS, VideoConfig


def _read(path: str | os.PathLike) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image-stage checkpoint {path} does not exist (train one: train_adapter.py --modality image)")
    with checkpoint_read_errors(path):
        return torch.load(path, map_location="cpu", weights_only=False)


def video_stage_config(video: VideoConfig, image_checkpoint: str | os.PathLike) -> ModelConfig:
    """The model configuration of the video stage on top of ``image_checkpoint``'s model.

    The files its parts were loaded from are dropped (:func:`~mm_llama.model.without_weight_files`):
    their weights are in the image-stage checkpoint (and the stage-1 file may have moved).
    """
    base = _read(image_checkpoint).get("hyper_parameters", {}).get("model") or ModelConfig()
    # The prompt reader is the image path's alone (it reads a prompt against one image).
    return dataclasses.replace(without_weight_files(base), video=video, trainable=VIDEO_GROUPS, prompt_reader=None)


def load_stage_weights(model: MultimodalLlama, path: str | os.PathLike, lm_sha256: str | None = None) -> list[str]:
    """Load the trained weights of an earlier stage's ``adapter.ckpt`` / ``last.ckpt`` into ``model``.

    Args:
        model: the new stage's model.
        path: a checkpoint written by :class:`~mm_llama.training.module.AdapterModule`.
        lm_sha256: the frozen LM's digest; the checkpoint must have been trained on it.

    Returns:
        The names the checkpoint lacked (the video branch), which keep their initialisation.

    Raises:
        ValueError: another LM, weights the model does not have, or missing weights that
            are not the video branch's.
    """
    checkpoint = _read(path)
    found = (checkpoint.get("lm_identity") or {}).get("sha256")
    if lm_sha256 is not None and found != lm_sha256:
        raise ValueError(f"{path} was trained on another LM (sha256 {str(found)[:12]}…, this one {lm_sha256[:12]}…)")
    state = {k.removeprefix("model."): v for k, v in checkpoint.get("state_dict", {}).items()}
    if model.prompt_reader is None:  # an image model's prompt reader: the video stage has none
        state = {k: v for k, v in state.items() if not k.startswith(("prompt_reader.", "prompt_projection."))}
    expected = set(model.trainable_state_dict())
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    not_video = [k for k in missing if model.group_of(k) not in VIDEO_GROUPS]
    if unexpected or not_video:
        raise ValueError(f"{path} does not fit this model: unexpected {unexpected[:5]}, missing {not_video[:5]} "
                         "(is it a checkpoint of the same image configuration?)")
    model.load_state_dict(state, strict=False)
    if missing:  # a new video stage: <|video|> starts as the trained <|image|> ("media here") embedding
        with torch.no_grad():
            table = model.fusion_embed.new.weight
            table[MEDIA_TOKENS.index("video")] = table[MEDIA_TOKENS.index("image")]
    return missing


def check_video_stage_trainable(model: MultimodalLlama) -> None:
    """Raise ``RuntimeError`` unless exactly the video branch's parameters require gradients."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    video = {n for n, _ in model.named_parameters() if model.group_of(n) in VIDEO_GROUPS}
    if not video or trainable != video:
        raise RuntimeError(
            f"the video stage must train exactly the video branch ({len(video)} tensors): "
            f"also trainable {sorted(trainable - video)[:5]}, frozen {sorted(video - trainable)[:5]}"
        )
