"""Training and evaluation transforms, on torchvision.transforms.v2 and tv_tensors.BoundingBoxes.

A transform takes and returns (image, target) as the datasets give them: image a tv_tensors.Image [3, H, W]
(uint8 or float), target a dict whose "boxes" are tv_tensors.BoundingBoxes; "labels" and "iscrowd" stay in step
with the boxes. The output image is float32 in [0, 1]: normalisation by the ImageNet mean and std is done by the
model, so that the data pipeline holds no backbone-specific constants and drawn images look like images.

Evaluation only resizes, so boxes map back to the original image by the per-axis scale that `collate_detection`
records; training adds the augmentation of retinanet.data.augment (the paper's horizontal flips by default). The
sizes are the model's (ModelConfig.min_size, max_size, train_min_sizes) and the rule is `retinanet.ops.resize`'s,
the model's own.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from retinanet.data.augment import PRESETS, Augmentation, augmentation_transforms
from retinanet.ops.resize import resized_size

__all__ = ["ResizeShortLong", "eval_transforms", "resized_size", "train_transforms"]


class ResizeShortLong(v2.Transform):
    """Resize so the shorter side is a size drawn from min_sizes and the longer side is at most max_size.

    Detectron's rule: scale = min(s / short side, max_size / long side) with s drawn uniformly from min_sizes
    (a single size for evaluation). v2.Resize(size, max_size=...) takes one size only, hence this transform.
    scale_jitter (low, high): both sizes times a factor drawn uniformly from it (training's scale augmentation).
    The draws use torch's random generator, which DataLoader seeds per worker.
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int, scale_jitter: tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__()
        if not min_sizes or min(min_sizes) <= 0 or max_size <= 0:
            raise ValueError(f"ResizeShortLong: expected positive min_sizes and max_size, got {min_sizes}, {max_size}")
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)
        self.scale_jitter = (float(scale_jitter[0]), float(scale_jitter[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        low, high = self.scale_jitter
        factor = float(torch.empty(()).uniform_(low, high)) if high > low else low
        size = resized_size(height, width, round(min_size * factor), round(self.max_size * factor))
        return {"size": list(size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)

    # torchvision < 0.21 calls these names
    _get_params = make_params
    _transform = transform


def _labels_and_iscrowd(inputs: Any) -> tuple[torch.Tensor, ...]:
    """The per-box tensors SanitizeBoundingBoxes must filter along with the boxes."""
    target = inputs[1]
    return tuple(target[k] for k in ("labels", "iscrowd") if k in target)


def train_transforms(min_sizes: Sequence[int], max_size: int, augmentation: Augmentation | None = None) -> v2.Compose:
    """The training transforms: the augmentation's photometric jitter, flips and rotations, the multi-scale resize
    (with its scale jitter), its random crop, float32 in [0, 1], and removal of boxes under 1 px.

    min_sizes: shorter-side sizes to draw from per image, e.g. (640, 672, 704, 736, 768, 800).
    max_size: the cap on the longer side, e.g. 1333.
    augmentation: retinanet.data.augment.Augmentation (None: the paper's horizontal flips). Its mosaic is the
        dataset's (DetectionDataset.mosaic), which needs other images.
    """
    aug = augmentation or PRESETS["flip"]
    before, crop = augmentation_transforms(aug)
    return v2.Compose(
        [
            *before,
            ResizeShortLong(min_sizes, max_size, aug.scale_jitter),
            *crop,
            v2.ToDtype(torch.float32, scale=True),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_and_iscrowd),
        ]
    )


def eval_transforms(min_size: int, max_size: int) -> v2.Compose:
    """Resize to one scale and convert to float32 in [0, 1]; boxes are kept as they are (none dropped)."""
    return v2.Compose([ResizeShortLong((min_size,), max_size), v2.ToDtype(torch.float32, scale=True)])
