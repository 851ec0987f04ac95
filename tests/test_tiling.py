"""Image tiling for the Mllama vision encoder (canvas choice, tile order, batch padding)."""

import pytest
import torch

from encoders.mllama_vision import tile_arrangements
from encoders.preprocess import CLIP_MEAN, CLIP_STD
from encoders.tiling import choose_canvas, collate_tiled, tile_image


def test_arrangements_in_aspect_ratio_id_order():
    assert tile_arrangements(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    assert tile_arrangements(1) == ((1, 1),)


@pytest.mark.parametrize(
    ("height", "width", "grid"),
    [
        (336, 336, (1, 1)),
        (336, 672, (1, 2)),  # wide: two tiles side by side
        (1000, 300, (3, 1)),  # tall: 3 rows upscale least (1.008) among grids that upscale
        (100, 100, (1, 1)),  # small: the smallest canvas that upscales
        (2000, 2000, (2, 2)),  # large: every grid downscales; 2x2 downscales least
    ],
)
def test_choose_canvas(height, width, grid):
    assert choose_canvas(height, width, 336, tile_arrangements(4)) == grid


def test_tiles_are_row_major_and_padded():
    image = torch.full((3, 32, 24), 51, dtype=torch.uint8)  # grey; fits a 2x2 canvas of 16-pixel tiles unscaled
    image[:, :16, :16] = 255  # top-left quadrant white
    tiled = tile_image(image, 16, 4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert tiled.grid == (2, 2) and tiled.aspect_ratio_id == tile_arrangements(4).index((2, 2)) + 1
    assert tiled.tiles.shape == (4, 3, 16, 16)
    grey = 51 / 255
    assert torch.all(tiled.tiles[0] == 1)  # top-left
    assert torch.allclose(tiled.tiles[1][:, :, :8], torch.tensor(grey))  # top-right: 8 image columns ...
    assert torch.all(tiled.tiles[1][:, :, 8:] == 0)  # ... then black canvas padding
    assert torch.allclose(tiled.tiles[2], torch.tensor(grey))  # bottom-left
    assert torch.all(tiled.tiles[3][:, :, 8:] == 0)


def test_collate_pads_images_and_tiles():
    g = torch.Generator().manual_seed(0)
    wide = tile_image(torch.rand(3, 16, 48, generator=g), 16, 4)  # 1x3
    batch = collate_tiled([[wide], []], max_num_tiles=4)
    assert batch.pixel_values.shape == (2, 1, 4, 3, 16, 16)
    assert batch.aspect_ratio_ids.tolist() == [[3], [0]]
    assert batch.aspect_ratio_mask.tolist() == [[[1, 1, 1, 0]], [[1, 0, 0, 0]]]  # tile 0 kept, as the reference
    assert torch.equal(batch.pixel_values[0, 0, :3], wide.tiles) and not batch.pixel_values[0, 0, 3].any()
    with pytest.raises(ValueError, match="max_num_tiles=2"):
        collate_tiled([[wide]], max_num_tiles=2)


def test_matches_transformers_processor():
    pytest.importorskip("transformers")
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor, get_optimal_tiled_canvas

    for height in range(5, 200, 13):
        for width in range(5, 200, 17):
            expected = tuple(int(v) for v in get_optimal_tiled_canvas(height, width, 4, 16))
            assert tuple(16 * v for v in choose_canvas(height, width, 16, tile_arrangements(4))) == expected

    processor = MllamaImageProcessor(size={"height": 16, "width": 16}, max_image_tiles=4,
                                     image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for h, w in [(20, 50), (40, 37), (9, 9), (70, 12)]]
    expected = processor(images=[[im] for im in images], return_tensors="pt")
    ours = collate_tiled([[tile_image(im, 16, 4)] for im in images], 4)
    assert torch.equal(ours.aspect_ratio_ids, expected["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, expected["aspect_ratio_mask"])
    assert (ours.pixel_values - expected["pixel_values"]).abs().max() < 1e-5
