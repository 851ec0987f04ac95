"""PIL image -> normalised tensor for :class:`encoders.image.ImageEncoder`.

No geometric augmentation, ever by default: a horizontal flip or a random crop
silently falsifies captions that mention positions ("the cup left of the
plate"), and the encoder sees whole images at test time. ``augment=True`` adds
only a mild brightness/contrast jitter, which keeps positions and hues (colour
words) intact.
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch
from torch import Tensor
from torchvision.transforms import v2

# Per-channel RGB statistics of OpenAI CLIP's training set, used by open_clip's
# and Llama 3's ViTs alike.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    # A named function, not a lambda, so the transform pickles into DataLoader workers.
    return image.convert("RGB")


def image_transform(image_size: int, train: bool, augment: bool = False) -> Callable[[PIL.Image.Image], Tensor]:
    """Build the transform from any-mode PIL image to a ``[3, image_size, image_size]`` float tensor.

    Steps: convert to RGB (alpha dropped, greyscale replicated, as CLIP does),
    squash-resize to a square (bicubic, antialiased; the aspect ratio is not
    kept, so no content is cropped away), scale to ``[0, 1]``, normalise with
    :data:`CLIP_MEAN` / :data:`CLIP_STD`.

    Args:
        image_size: output side in pixels.
        train: building the training transform; only matters with ``augment``.
        augment: when training, add a brightness/contrast jitter of 0.2.
            Never geometric (see the module docstring).

    Returns:
        A callable ``PIL.Image.Image -> Tensor[3, image_size, image_size]`` (float32).
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    steps: list[Callable] = [
        v2.Lambda(_to_rgb),
        v2.PILToTensor(),  # [3, H, W] uint8
        v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
    ]
    if train and augment:
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2))
    steps += [
        v2.ToDtype(torch.float32, scale=True),  # [0, 1]
        v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)
