"""Box regression losses on [N, 4] boxes or encoded deltas: smooth L1 (Detectron's), L1 (detectron2's), and the
IoU family on decoded boxes, torchvision's: GIoU (Rezatofighi et al. 2019), DIoU and CIoU (Zheng et al. 2020).

The IoU losses judge a box by its overlap with its object, the measure AP counts, rather than by its four deltas
one by one; DIoU adds the distance between the centres (over the enclosing box's diagonal), CIoU also the difference
of aspect ratios:

    GIoU = 1 - IoU + |C - A u B| / |C|        DIoU = 1 - IoU + rho^2 / c^2        CIoU = DIoU + alpha v
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import ops

from retinanet.ops.losses import Reduction, check_reduction

__all__ = ["IOU_LOSSES", "smooth_l1_loss", "l1_loss", "giou_loss", "diou_loss", "ciou_loss"]


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float = 1.0 / 9.0, reduction: Reduction = "sum") -> Tensor:
    """Smooth L1 (Huber with slope 1) on box deltas: 0.5 d^2 / beta for |d| < beta, else |d| - 0.5 beta.

    input, target: [N, 4] float encoded deltas. beta = 0 is L1. Detectron used beta = 0.11.
    """
    check_reduction(reduction)
    if beta < 1e-5:
        return l1_loss(input, target, reduction)
    d = (input - target).abs()
    loss = torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    return _reduce(loss, reduction)


def l1_loss(input: Tensor, target: Tensor, reduction: Reduction = "sum") -> Tensor:
    """L1 loss on box deltas; input, target: [N, 4] float."""
    check_reduction(reduction)
    return _reduce((input - target).abs(), reduction)


def giou_loss(boxes: Tensor, target_boxes: Tensor, reduction: Reduction = "sum", eps: float = 1e-7) -> Tensor:
    """1 - generalised IoU of decoded boxes, elementwise over pairs. boxes, target_boxes: [N, 4] float XYXY."""
    return _iou_loss(ops.generalized_box_iou_loss, boxes, target_boxes, reduction, eps)


def diou_loss(boxes: Tensor, target_boxes: Tensor, reduction: Reduction = "sum", eps: float = 1e-7) -> Tensor:
    """1 - IoU + (distance between the centres / diagonal of the enclosing box)^2, over pairs of [N, 4] XYXY."""
    return _iou_loss(ops.distance_box_iou_loss, boxes, target_boxes, reduction, eps)


def ciou_loss(boxes: Tensor, target_boxes: Tensor, reduction: Reduction = "sum", eps: float = 1e-7) -> Tensor:
    """DIoU + alpha v, v = (4 / pi^2) (atan(w_t / h_t) - atan(w / h))^2 and alpha = v / (1 - IoU + v): the aspect
    ratio too. Over pairs of [N, 4] float XYXY boxes."""
    return _iou_loss(ops.complete_box_iou_loss, boxes, target_boxes, reduction, eps)


IOU_LOSSES = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}


def _iou_loss(fn, boxes: Tensor, target_boxes: Tensor, reduction: str, eps: float) -> Tensor:
    check_reduction(reduction)
    if boxes.shape != target_boxes.shape or boxes.shape[-1:] != (4,):
        raise ValueError(
            f"boxes and target_boxes must both be [N, 4], got {tuple(boxes.shape)} and {tuple(target_boxes.shape)}"
        )
    if boxes.numel() == 0:  # torchvision's mean of nothing is NaN; the sum of nothing is 0
        return _reduce(boxes.new_zeros(boxes.shape[:-1]), reduction)
    return _reduce(fn(boxes, target_boxes, reduction="none", eps=eps), reduction)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    return loss
