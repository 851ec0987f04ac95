"""Image → tiles + aspect-ratio id, the input format of :class:`encoders.mllama_vision.MllamaVisionEncoder`.

Llama 3 (paper §7.2) resizes an image to fit a canvas of up to ``max_num_tiles`` square
tiles (672², 672x336, 1344x336 ... for 336-pixel tiles). The canvas is chosen as in
Meta's reference and ``transformers``' ``MllamaImageProcessor``: the grid that needs
the smallest upscaling, or, if every grid needs downscaling, the one that downscales
least; ties go to the smaller canvas. The image keeps its aspect ratio, is
padded with black on the bottom/right, normalised and cut into tiles row by row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from encoders.mllama_vision import TiledImages, tile_arrangements
from encoders.preprocess import CLIP_MEAN, CLIP_STD


@dataclass
class TiledImage:
    """One image cut into tiles.

    Attributes:
        tiles: ``[n_tiles, 3, tile, tile]`` normalised tiles, row-major over the grid.
        grid: ``(rows, cols)`` of the canvas.
        aspect_ratio_id: 1-based index of ``grid`` in the supported aspect ratios.
    """

    tiles: Tensor
    grid: tuple[int, int]
    aspect_ratio_id: int


def choose_canvas(
    height: int, width: int, tile_size: int, arrangements: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The ``(rows, cols)`` grid an ``height x width`` image is fitted to (see module docstring)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scales = [min(rows * tile_size / height, cols * tile_size / width) for rows, cols in arrangements]
    upscales = [s for s in scales if s >= 1]
    best = min(upscales) if upscales else max(scales)
    candidates = [grid for grid, s in zip(arrangements, scales) if s == best]
    return min(candidates, key=lambda grid: grid[0] * grid[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """Resized ``(height, width)`` inside the canvas, aspect ratio kept, no side below one tile
    unless the canvas is smaller."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tile_image(
    image: Tensor,
    tile_size: int,
    max_num_tiles: int,
    arrangements: Sequence[tuple[int, int]] | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> TiledImage:
    """Resize, pad, normalise and tile one image.

    Args:
        image: ``[3, H, W]``, uint8 or float in ``[0, 1]``.
        tile_size: tile side in pixels.
        max_num_tiles: most tiles per image.
        arrangements: supported ``(rows, cols)`` grids, in aspect-ratio-id order;
            default :func:`encoders.mllama_vision.tile_arrangements`.
        mean, std: per-channel normalisation (Llama 3.2 Vision uses CLIP's).

    Returns:
        A :class:`TiledImage` with ``rows * cols`` tiles.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {tuple(image.shape)}")
    arrangements = tuple(arrangements or tile_arrangements(max_num_tiles))
    height, width = image.shape[-2:]
    rows, cols = choose_canvas(height, width, tile_size, arrangements)
    new_h, new_w = fit_to_canvas(height, width, rows * tile_size, cols * tile_size, tile_size)
    # uint8 is resized as uint8 (rounded), as the reference processor does
    image = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    image = TF.pad(image, [0, 0, cols * tile_size - new_w, rows * tile_size - new_h], fill=0)  # [3, rH, cW]
    image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    image = TF.normalize(image, list(mean), list(std))
    tiles = image.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)  # [rows, cols, 3, T, T]
    tiles = tiles.reshape(rows * cols, 3, tile_size, tile_size)
    return TiledImage(tiles=tiles, grid=(rows, cols), aspect_ratio_id=arrangements.index((rows, cols)) + 1)


def collate_tiled(batch: Sequence[Sequence[TiledImage]], max_num_tiles: int) -> TiledImages:
    """Pad a batch of samples (each a list of tiled images, possibly empty) into :class:`TiledImages`.

    Empty image slots get aspect-ratio id 0 and zero pixels; as in the reference, tile 0
    of every slot is marked real in ``aspect_ratio_mask`` (the encoder's output mask
    still hides empty slots through their id).
    """
    if not batch:
        raise ValueError("collate_tiled needs at least one sample")
    m = max(1, max(len(images) for images in batch))
    shapes = {tuple(im.tiles.shape[1:]) for images in batch for im in images}
    if len(shapes) > 1:
        raise ValueError(f"all tiles must have one shape, got {sorted(shapes)}")
    tile_shape = shapes.pop() if shapes else (3, 1, 1)
    pixels = torch.zeros(len(batch), m, max_num_tiles, *tile_shape)
    ids = torch.zeros(len(batch), m, dtype=torch.long)
    mask = torch.zeros(len(batch), m, max_num_tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    for i, images in enumerate(batch):
        for j, im in enumerate(images):
            n_tiles = im.tiles.shape[0]
            if n_tiles > max_num_tiles:
                raise ValueError(f"image {j} of sample {i} has {n_tiles} tiles > max_num_tiles={max_num_tiles}")
            pixels[i, j, :n_tiles] = im.tiles
            ids[i, j] = im.aspect_ratio_id
            mask[i, j, :n_tiles] = 1
    return TiledImages(pixels, ids, mask)
