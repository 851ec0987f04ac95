"""PIL image -> normalised tensor for :class:`encoders.image.ImageEncoder`.

No geometric augmentation, ever by default: a horizontal flip or a random crop
silently falsifies captions that mention positions ("the cup left of the
plate"), and the encoder sees whole images at test time. ``augment=True`` adds
only a mild brightness/contrast jitter, which keeps positions and hues (colour
words) intact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# Per-channel RGB statistics of OpenAI CLIP's training set, used by open_clip's
# and Llama 3's ViTs alike.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """Any-mode PIL image -> normalised ``[3, image_size, image_size]`` float32 tensor (see
    :func:`image_transform`).

    The same operations, in the same order, as torchvision's composed ``v2`` pipeline
    (:func:`torchvision_image_transform`) and so the same values bit for bit
    (``tests/test_image_encoder.py``), called directly: the composed transforms spent most of
    the loader's time on their own bookkeeping (benchmarks/RESULTS.md, "Speed"). A plain object
    with tensors and a ``ColorJitter``: it pickles into DataLoader workers.
    """

    def __init__(self, image_size: int, jitter: v2.ColorJitter | None = None) -> None:
        self.size = [image_size, image_size]
        self.jitter = jitter
        self.mean = torch.tensor(CLIP_MEAN).view(-1, 1, 1)  # [3, 1, 1]
        self.std = torch.tensor(CLIP_STD).view(-1, 1, 1)

    def __call__(self, image: PIL.Image.Image) -> Tensor:
        rgb = image.convert("RGB")  # alpha dropped, greyscale replicated
        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W] uint8
        x = TF.resize(x, self.size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)  # as is if already square
        if self.jitter is not None:
            x = self.jitter(x)
        x = x.to(torch.float32).mul_(1.0 / 255)  # [0, 1]
        return x.sub(self.mean).div_(self.std)


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
        An :class:`ImageTransform`: ``PIL.Image.Image -> Tensor[3, image_size, image_size]`` (float32).
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    return ImageTransform(image_size, v2.ColorJitter(brightness=0.2, contrast=0.2) if train and augment else None)


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.convert("RGB")


def torchvision_image_transform(image_size: int, train: bool, augment: bool = False) -> v2.Compose:
    """:func:`image_transform` written as torchvision's composed ``v2`` transforms: the reference
    the direct :class:`ImageTransform` is tested against."""
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
