"""Media encoders: each maps raw media to tokens ``[b, s_e, d_e]`` plus a padding mask."""

from encoders.base import EncoderOutput, MediaEncoder
from encoders.image import (
    BACKBONES,
    GatedSelfAttentionBlock,
    ImageEncoder,
    ImageEncoderConfig,
    OpenClipViT,
    TimmViT,
    ViTBackbone,
)
from encoders.preprocess import CLIP_MEAN, CLIP_STD, image_transform

__all__ = [
    "BACKBONES",
    "CLIP_MEAN",
    "CLIP_STD",
    "EncoderOutput",
    "GatedSelfAttentionBlock",
    "ImageEncoder",
    "ImageEncoderConfig",
    "MediaEncoder",
    "OpenClipViT",
    "TimmViT",
    "ViTBackbone",
    "image_transform",
]
