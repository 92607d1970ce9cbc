"""The one resize rule: the shorter side to min_size, the longer side at most max_size.

Training (with the shorter side drawn from train_min_sizes), evaluation, detection, the predictor and export all
resize by `resized_size` and `resize_image`, with the sizes of the model's config, so that a checkpoint sees the
same pixels however it is used.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.transforms.v2 import functional as F

__all__ = ["resized_size", "resize_image"]


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The (h, w) that brings the shorter side to min_size unless the longer side would pass max_size.

    scale = min(min_size / short side, max_size / long side); each side is rounded to the nearest pixel.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """image [..., H, W] (uint8 or float) resized to size (h, w): bilinear with antialiasing, the same kernel for
    the training and evaluation transforms and the model's own resize."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.resize(image, list(size), antialias=True)
