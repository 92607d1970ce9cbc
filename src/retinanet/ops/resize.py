"""The one resize rule and the one padding rule.

Resize: the shorter side to min_size, the longer side at most max_size (`resize_scale`, `resized_size`,
`resize_image`). Training (with the shorter side drawn from train_min_sizes), evaluation, detection, the predictor
and export all resize by these, with the sizes of the model's config, so that a checkpoint sees the same pixels
however it is used. Padding: a batch is zero-padded at the bottom and right to sides that are multiples of the
model's size_divisible (`padded_size`). torchvision's weights were trained with torchvision's own resize (bilinear
without antialiasing, on the normalised image): `resize_like_torchvision` is that rule, for their exact detections.
"""

from __future__ import annotations

import torch.nn.functional as nnf
from torch import Tensor
from torchvision.transforms.v2 import functional as F

__all__ = ["padded_size", "resize_image", "resize_like_torchvision", "resize_scale", "resized_size"]


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """min(min_size / shorter side, max_size / longer side): the factor that brings the shorter side to min_size
    unless the longer side would pass max_size."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The (h, w) of an image resized by `resize_scale`; each side rounded to the nearest pixel."""
    scale = resize_scale(height, width, min_size, max_size)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """image [..., H, W] (uint8 or float) resized to size (h, w): bilinear with antialiasing, the same kernel for
    the training and evaluation transforms and the model's own resize."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.resize(image, list(size), antialias=True)


def resize_like_torchvision(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """Float image [3, H, W] resized as torchvision's GeneralizedRCNNTransform resizes: by `resize_scale`, bilinear
    without antialiasing, the scale factor recomputed from the rounded size (the rule of models with
    resize_antialias False: torchvision's weights)."""
    scale = resize_scale(image.shape[-2], image.shape[-1], min_size, max_size)
    return nnf.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


def padded_size(size_hw: tuple[int, int], size_divisible: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of size_divisible: the padded input of a batch whose largest image is h x w."""
    d = size_divisible
    return -(-int(size_hw[0]) // d) * d, -(-int(size_hw[1]) // d) * d
