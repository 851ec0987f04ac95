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
from encoders.mllama_vision import MllamaVisionEncoder, MllamaVisionEncoderConfig, TiledImages
from encoders.preprocess import CLIP_MEAN, CLIP_STD, image_transform
from encoders.tiling import TiledImage, collate_tiled, tile_image

__all__ = [
    "BACKBONES",
    "CLIP_MEAN",
    "CLIP_STD",
    "EncoderOutput",
    "GatedSelfAttentionBlock",
    "ImageEncoder",
    "ImageEncoderConfig",
    "MediaEncoder",
    "MllamaVisionEncoder",
    "MllamaVisionEncoderConfig",
    "OpenClipViT",
    "TiledImage",
    "TiledImages",
    "TimmViT",
    "ViTBackbone",
    "collate_tiled",
    "image_transform",
    "tile_image",
]
