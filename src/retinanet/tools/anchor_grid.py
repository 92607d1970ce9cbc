"""The best IoU an anchor of a grid can reach with a box, in closed form: the anchors' shapes, and a box's offsets from
the nearest anchor centres of each level's grid (what anchor coverage and the anchor fit both compute)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from retinanet.ops.anchors import AnchorGenerator, grid_sizes

__all__ = ["GridOffsets", "anchor_shapes", "best_iou_on_grid"]


def anchor_shapes(sizes_per_level: Sequence[Sequence[float]], ratios: Sequence[float]) -> Tensor:
    """[L, A, 2] anchor (width, height) per level, ratio-major then size, as AnchorGenerator orders them."""
    sizes = torch.tensor(sizes_per_level, dtype=torch.float64)  # [L, S]
    h_ratio = torch.tensor(ratios, dtype=torch.float64).sqrt()  # [R]
    ws = (sizes[:, None, :] / h_ratio[None, :, None]).reshape(len(sizes), -1)
    hs = (sizes[:, None, :] * h_ratio[None, :, None]).reshape(len(sizes), -1)
    return torch.stack((ws, hs), -1)


@dataclass
class GridOffsets:
    """Per box (one per image and training size): wh [N, 2] its width and height, and per level d [N, L, 2] the
    x and y distance from its centre to the nearest anchor centre of the level's grid (inside the grid)."""

    wh: Tensor
    d: Tensor

    @classmethod
    def of_image(cls, boxes: Tensor, padded_hw: tuple[int, int], generator: AnchorGenerator) -> "GridOffsets":
        """The offsets of one image's boxes [G, 4] on the grids of its padded input."""
        grids = grid_sizes(padded_hw, generator.num_levels)
        strides = torch.tensor(generator.strides_for(grids, padded_hw), dtype=torch.float64)  # [L, 2] (y, x)
        b = boxes.double()
        centre = torch.stack(((b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2), 1)  # [G, 2] (y, x)
        index = (centre[:, None] / strides - generator.offset).round().clamp(min=0)
        index = torch.minimum(index, torch.tensor(grids, dtype=torch.float64) - 1)
        nearest = (index + generator.offset) * strides
        return cls(b[:, 2:] - b[:, :2], (nearest - centre[:, None]).abs().flip(-1))  # d as (x, y)

    @classmethod
    def of(cls, box_set: Any, generator: AnchorGenerator) -> "GridOffsets":
        """The offsets of every box of `box_set` (a retinanet.tools.anchor_coverage.BoxSet)."""
        parts = [cls.of_image(b, p, generator) for b, p in zip(box_set.boxes_per_entry, box_set.padded_sizes) if len(b)]
        if not parts:
            return cls(torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, generator.num_levels, 2))
        return cls(torch.cat([p.wh for p in parts]), torch.cat([p.d for p in parts]))

    def subset(self, count: int, seed: int = 0) -> "GridOffsets":
        """At most `count` of the boxes, drawn at random (reproducibly), in float32 (enough for a search)."""
        pick = torch.randperm(len(self.wh), generator=torch.Generator().manual_seed(seed))[:count]
        return GridOffsets(self.wh[pick].float(), self.d[pick].float())


def best_iou_on_grid(offsets: GridOffsets, shapes: Tensor, reduce: bool = True) -> Tensor:
    """[N] (in the offsets' dtype) each box's highest IoU with any anchor, in closed form: per level and shape the
    anchor centred nearest the box's centre (on each axis IoU only falls as the centres part).

    shapes: [L, A, 2] anchor (width, height) per level (`anchor_shapes`, or `level_shapes` of a generator).
    reduce=False: the IoU per level and shape, [N, L, A], instead of the maximum."""
    if not len(offsets.wh):
        return offsets.wh.new_zeros(0)
    shapes = shapes.to(offsets.wh.dtype)
    half_box = offsets.wh[:, None, None, :] / 2  # [N, 1, 1, 2]
    half_anchor = shapes[None] / 2  # [1, L, A, 2]
    d = offsets.d[:, :, None, :]  # [N, L, 1, 2]
    # the box spans [-half_box, half_box] on each axis, the anchor [d - half_anchor, d + half_anchor]
    overlap = (torch.minimum(half_box, d + half_anchor) + torch.minimum(half_box, half_anchor - d)).clamp_(min=0)
    inter = overlap[..., 0] * overlap[..., 1]
    union = (offsets.wh.prod(1)[:, None, None] + shapes.prod(-1)[None]) - inter
    iou = inter / union
    return iou.flatten(1).amax(1) if reduce else iou
