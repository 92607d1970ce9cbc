"""Online hard example mining (OHEM), the paper's baseline for the class imbalance (Table 1d): the hardest anchors of
an image by their CE, after NMS over the scored anchors, up to a budget, with an optional SSD-style ratio."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from retinanet.ops.losses import compute_dtype

__all__ = ["hard_negative_mining", "ohem_loss_from_labels"]


def hard_negative_mining(
    anchor_losses: Tensor,
    is_positive: Tensor,
    budget: int = 128,
    neg_pos_ratio: float | None = None,
    boxes: Tensor | None = None,
    nms_thresh: float | None = None,
) -> Tensor:
    """Which anchors of one image to keep for the loss, by highest loss (the paper's OHEM baseline, Table 1d).

    Args:
        anchor_losses: [N] float loss per anchor (e.g. CE summed over classes), detached.
        is_positive: [N] bool, anchors matched to a box; ignored anchors should be excluded beforehand.
        budget: keep at most this many anchors in all (the paper's minibatch size per image: 128, 256, 512).
        neg_pos_ratio: if set (SSD's 3:1 is 3.0), keep at most ratio x (#positives) negatives.
        boxes, nms_thresh: [N, 4] XYXY boxes of the anchors: as the paper's OHEM, first suppress, by NMS at
            nms_thresh (0.5 or 0.7 in Table 1d) with the loss as score, anchors that overlap a harder one.
    Returns:
        [N] bool mask of the kept anchors: the highest-loss ones, positives and negatives alike when no ratio is
        given (the paper's "OHEM"), or all positives (up to the budget) plus the hardest negatives with a ratio.
    """
    if anchor_losses.shape != is_positive.shape or anchor_losses.dim() != 1:
        raise ValueError("anchor_losses and is_positive must both be [N]")
    losses = anchor_losses.detach()
    if boxes is None or nms_thresh is None:
        return _hardest(losses, is_positive, budget, neg_pos_ratio)
    from torchvision.ops import nms

    survivors = nms(boxes.float(), losses.float(), nms_thresh)
    keep = torch.zeros_like(is_positive, dtype=torch.bool)
    keep[survivors[_hardest(losses[survivors], is_positive[survivors], budget, neg_pos_ratio)]] = True
    return keep


def _hardest(losses: Tensor, is_positive: Tensor, budget: int, neg_pos_ratio: float | None) -> Tensor:
    keep = torch.zeros_like(is_positive, dtype=torch.bool)
    if neg_pos_ratio is None:
        k = min(budget, losses.numel())
        keep[losses.topk(k).indices] = True
        return keep
    pos_idx = torch.nonzero(is_positive).squeeze(1)
    if pos_idx.numel() > budget:
        pos_idx = pos_idx[losses[pos_idx].topk(budget).indices]
    keep[pos_idx] = True
    num_neg = min(int(math.ceil(neg_pos_ratio * max(pos_idx.numel(), 1))), budget - pos_idx.numel())
    neg_losses = losses.masked_fill(is_positive, float("-inf"))
    num_neg = min(num_neg, int((~is_positive).sum()))
    if num_neg > 0:
        keep[neg_losses.topk(num_neg).indices] = True
    return keep


def ohem_loss_from_labels(
    logits: Tensor,
    labels: Tensor,
    budget: int = 128,
    neg_pos_ratio: float | None = None,
    background_label: int = -1,
    ignore_label: int = -2,
    anchors: Tensor | None = None,
    nms_thresh: float | None = None,
) -> Tensor:
    """Summed CE over the hard examples of one image: CE per anchor (summed over classes), then
    `hard_negative_mining` picks the anchors (after NMS over `anchors` [N, 4] at nms_thresh, if given).
    logits: [N, K]; labels: [N] as in `sigmoid_focal_loss_from_labels`. Returns a scalar sum (normalise outside)."""
    valid = labels != ignore_label
    classes = torch.arange(logits.shape[1], device=logits.device)
    x = logits.to(compute_dtype(logits))
    onehot = (labels.unsqueeze(1) == classes).to(x.dtype)
    ce = F.binary_cross_entropy_with_logits(x, onehot, reduction="none").sum(1)
    is_pos = (labels >= 0) & valid
    keep = torch.zeros_like(valid)
    idx = torch.nonzero(valid).squeeze(1)
    boxes = None if anchors is None else anchors[idx]
    keep[idx] = hard_negative_mining(ce[idx].detach(), is_pos[idx], budget, neg_pos_ratio, boxes, nms_thresh)
    return (ce * keep).sum()
