"""Box regression losses on [N, 4] boxes or encoded deltas: smooth L1 (Detectron's), L1 (detectron2's) and GIoU."""

from __future__ import annotations

import torch
from torch import Tensor

from retinanet.ops.losses import Reduction, check_reduction

__all__ = ["smooth_l1_loss", "l1_loss", "giou_loss"]


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
    check_reduction(reduction)
    x1, y1, x2, y2 = boxes.unbind(-1)
    u1, v1, u2, v2 = target_boxes.unbind(-1)
    area = (x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)
    area_t = (u2 - u1).clamp_min(0) * (v2 - v1).clamp_min(0)
    inter = (torch.min(x2, u2) - torch.max(x1, u1)).clamp_min(0) * (torch.min(y2, v2) - torch.max(y1, v1)).clamp_min(0)
    union = area + area_t - inter
    iou = inter / (union + eps)
    hull = (torch.max(x2, u2) - torch.min(x1, u1)) * (torch.max(y2, v2) - torch.min(y1, v1))
    giou = iou - (hull - union) / (hull + eps)
    return _reduce(1.0 - giou, reduction)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    return loss
