"""Box formats, areas, IoU, clipping, scaling and validation.

The project has one box format: `boxes` is a float [N, 4] tensor of (x1, y1, x2, y2) in absolute pixels, with
x2 > x1 and y2 > y1 for a valid box. Any other format says so in its name (`boxes_xywh`) and is converted here, at
the edges (COCO files in and out).
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor

__all__ = [
    "box_area",
    "box_iou",
    "box_ioa",
    "clip_boxes",
    "paired_iou",
    "validate_boxes",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    "scale_boxes",
]

# Annotations often reach one pixel (or a rounding error) past the border; only more than this is an error.
OUTSIDE_TOLERANCE_PX = 1.0


def _check_shape(boxes: Tensor, name: str = "boxes") -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be [N, 4], got shape {tuple(boxes.shape)}")


def box_area(boxes: Tensor) -> Tensor:
    """Areas of boxes. boxes: [N, 4] float XYXY; returns [N] float, (x2 - x1) * (y2 - y1) (no +1)."""
    _check_shape(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU. boxes1: [N, 4], boxes2: [M, 4] float XYXY; returns [N, M] float (torchvision.ops.box_iou)."""
    _check_shape(boxes1, "boxes1")
    _check_shape(boxes2, "boxes2")
    return torchvision.ops.box_iou(boxes1, boxes2)


def paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of each pair of rows: boxes1, boxes2 [N, 4] float XYXY -> [N]. The same operations, in the same order, as
    torchvision.ops.box_iou, so a pair's IoU here equals its entry there bit for bit (thresholds agree)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area1 + area2 - inter)


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Pairwise intersection over the area of the first box. boxes: [N, 4], regions: [M, 4] float XYXY.

    Returns [N, M] float: the fraction of box n that lies inside region m (e.g. how much of an anchor is covered by a
    COCO crowd region). A box of zero area gets 0.
    """
    _check_shape(boxes)
    _check_shape(regions, "regions")
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    area = box_area(boxes).clamp_min(torch.finfo(inter.dtype).tiny)
    return inter / area[:, None]


def clip_boxes(boxes: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Boxes clipped to an image of (height, width). boxes: [N, 4] float XYXY; returns a new [N, 4] tensor.

    Clipping can leave degenerate boxes (zero width or height) when a box lies wholly outside the image.
    """
    _check_shape(boxes)
    height, width = size_hw
    x = boxes[:, 0::2].clamp(min=0, max=width)
    y = boxes[:, 1::2].clamp(min=0, max=height)
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def first_invalid_box(boxes: Tensor, image_size_hw: tuple[int, int] | None = None) -> tuple[int, str] | None:
    """Index of the first invalid box of [N, 4] XYXY `boxes` and why, or None when all are valid (one host sync)."""
    x1, y1, x2, y2 = boxes.unbind(1)
    checks = [
        (~torch.isfinite(boxes).all(dim=1), "has a non-finite coordinate"),
        (x2 <= x1, "has x2 <= x1"),
        (y2 <= y1, "has y2 <= y1"),
    ]
    if image_size_hw is not None:
        height, width = image_size_hw
        tol = OUTSIDE_TOLERANCE_PX
        outside = (x1 < -tol) | (y1 < -tol) | (x2 > width + tol) | (y2 > height + tol)
        checks.append((outside, f"lies outside the image (height {height}, width {width})"))
    bad = torch.zeros_like(x1, dtype=torch.bool)
    for mask, _ in checks:
        bad |= mask
    if not bool(bad.any()):  # one host-device sync for the common, valid case
        return None
    index = int(torch.nonzero(bad)[0, 0])
    reason = next(why for mask, why in checks if bool(mask[index]))
    return index, reason


def validate_boxes(boxes: Tensor, image_size_hw: tuple[int, int] | None = None, where: str = "") -> None:
    """Raise ValueError if any box is invalid; the message names `where`, the first bad box's index and values.

    Args:
        boxes: [N, 4] float XYXY in absolute pixels (N may be 0).
        image_size_hw: (height, width); if given, boxes reaching more than one pixel outside the image are invalid.
        where: where the boxes came from, e.g. "annotations.json, image 12", put at the head of the message.
    A box is invalid if a coordinate is not finite, x2 <= x1 or y2 <= y1.
    """
    prefix = f"{where}: " if where else ""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{prefix}boxes must be [N, 4] XYXY, got shape {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{prefix}boxes must be a float tensor, got {boxes.dtype}")
    if boxes.shape[0] == 0:
        return
    found = first_invalid_box(boxes, image_size_hw)
    if found is None:
        return
    index, reason = found
    values = [round(v, 4) if math.isfinite(v) else v for v in boxes[index].tolist()]
    raise ValueError(f"{prefix}box {index} {values} (x1, y1, x2, y2) {reason}")


def xywh_to_xyxy(boxes_xywh: Tensor) -> Tensor:
    """(x, y, width, height) boxes, e.g. from COCO, to XYXY. boxes_xywh: [N, 4] float; returns [N, 4] float."""
    _check_shape(boxes_xywh, "boxes_xywh")
    xy, wh = boxes_xywh[:, :2], boxes_xywh[:, 2:]
    return torch.cat((xy, xy + wh), dim=1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """XYXY boxes to (x, y, width, height), e.g. for COCO results. boxes: [N, 4] float; returns [N, 4] float."""
    _check_shape(boxes)
    xy1, xy2 = boxes[:, :2], boxes[:, 2:]
    return torch.cat((xy1, xy2 - xy1), dim=1)


def scale_boxes(boxes: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """Boxes scaled per axis, e.g. from a resized image back to the original. boxes: [N, 4] float; returns new."""
    _check_shape(boxes)
    factors = torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=boxes.dtype, device=boxes.device)
    return boxes * factors
