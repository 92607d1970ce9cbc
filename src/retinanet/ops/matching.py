"""Assigning anchors to ground-truth boxes, and the box coding of the regression targets.

The paper's rule (`match_anchors`): an anchor is foreground (matched to the box of highest IoU) when that IoU is
>= 0.5, background below 0.4, and ignored in between. ATSS (`atss_match_anchors`, Zhang et al., "Bridging the Gap
Between Anchor-based and Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020) instead takes, per
box, the anchors nearest its centre on each level and keeps those whose IoU is at least the mean plus the standard
deviation of theirs: the threshold adapts to each object's size and shape. The match result of one image is one
int64 per anchor: a gt index >= 0, BACKGROUND or IGNORE, the codes `sigmoid_focal_loss_from_labels` takes by default.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torchvision
from torch import Tensor

from retinanet.ops.boxes import box_ioa, paired_iou

__all__ = ["BACKGROUND", "IGNORE", "BoxCoder", "anchor_counts", "atss_match_anchors", "match_anchors"]

BACKGROUND = -1
IGNORE = -2


def _chunks(num_anchors: int, num_gt: int, chunk_elements: int) -> Iterator[slice]:
    """Anchor slices whose [num_gt, chunk] IoU matrix holds at most ~chunk_elements values."""
    step = max(1, chunk_elements // max(num_gt, 1))
    for start in range(0, num_anchors, step):
        yield slice(start, min(start + step, num_anchors))


def _best_gt_per_anchor(anchors: Tensor, gt_boxes: Tensor, chunk_elements: int) -> tuple[Tensor, Tensor, Tensor]:
    """First pass: per anchor the highest IoU [A] and its gt index [A] int64; per gt its highest IoU [G]."""
    num_anchors = anchors.shape[0]
    best_iou = anchors.new_empty(num_anchors)
    best_gt = torch.empty(num_anchors, dtype=torch.int64, device=anchors.device)
    gt_best_iou = anchors.new_full((gt_boxes.shape[0],), -1.0)
    for rows in _chunks(num_anchors, gt_boxes.shape[0], chunk_elements):
        iou = torchvision.ops.box_iou(gt_boxes, anchors[rows])  # [G, chunk]
        best_iou[rows], best_gt[rows] = iou.max(dim=0)
        gt_best_iou = torch.maximum(gt_best_iou, iou.max(dim=1).values)
    return best_iou, best_gt, gt_best_iou


def _low_quality_anchors(anchors: Tensor, gt_boxes: Tensor, gt_best_iou: Tensor, chunk_elements: int) -> Tensor:
    """Second pass: [A] bool, anchors whose IoU with some gt equals that gt's highest IoU (ties included), if > 0.

    The IoU of each chunk is recomputed by the same elementwise ops, so the equality test sees the very values the
    first pass took the maxima of."""
    hit = torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    target = gt_best_iou.masked_fill(gt_best_iou <= 0, math.nan)[:, None]  # nan equals nothing: no match at 0
    for rows in _chunks(anchors.shape[0], gt_boxes.shape[0], chunk_elements):
        hit[rows] = (torchvision.ops.box_iou(gt_boxes, anchors[rows]) == target).any(dim=0)
    return hit


def _covered_by_crowd(anchors: Tensor, crowd_boxes: Tensor, min_ioa: float, chunk_elements: int) -> Tensor:
    """[A] bool: anchors with intersection / anchor area >= min_ioa for some crowd region."""
    covered = torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    for rows in _chunks(anchors.shape[0], crowd_boxes.shape[0], chunk_elements):
        covered[rows] = (box_ioa(anchors[rows], crowd_boxes) >= min_ioa).any(dim=1)
    return covered


def _check_match_args(anchors: Tensor, gt_boxes: Tensor, fg_iou: float, bg_iou: float, gt_is_crowd) -> None:
    if anchors.dim() != 2 or anchors.shape[1] != 4 or gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(
            f"anchors and gt_boxes must be [A, 4] and [G, 4], got {tuple(anchors.shape)} and {tuple(gt_boxes.shape)}"
        )
    if not bg_iou <= fg_iou:
        raise ValueError(f"bg_iou must be <= fg_iou, got bg_iou {bg_iou} and fg_iou {fg_iou}")
    if gt_is_crowd is not None and gt_is_crowd.shape != gt_boxes.shape[:1]:
        raise ValueError(f"gt_is_crowd must be [G] = [{gt_boxes.shape[0]}], got {tuple(gt_is_crowd.shape)}")


def match_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    fg_iou: float = 0.5,
    bg_iou: float = 0.4,
    allow_low_quality: bool = False,
    gt_is_crowd: Tensor | None = None,
    chunk_elements: int = 4_000_000,
    crowd_ioa: float = 0.5,
) -> Tensor:
    """The gt box each anchor of one image is assigned to, by IoU.

    Args:
        anchors: [A, 4] float XYXY.
        gt_boxes: [G, 4] float XYXY of the image (G may be 0).
        fg_iou, bg_iou: max IoU >= fg_iou is foreground, < bg_iou background, in between ignored (paper: 0.5, 0.4).
        allow_low_quality: also match, for each gt, the anchors whose IoU with it equals its highest IoU (ties
            included, if > 0), even below fg_iou. As torchvision and Detectron, such an anchor gets the gt of its own
            highest IoU (the same one unless another gt overlaps it more).
        gt_is_crowd: [G] bool, COCO `iscrowd` regions. They are never match targets; an anchor that ends up not
            foreground and whose intersection over its own area with a crowd region is >= `crowd_ioa` is IGNORE.
        chunk_elements: anchors are processed in chunks so that at most about this many IoU values exist at once;
            the result does not depend on it.
    Returns:
        [A] int64: the matched index into gt_boxes (>= 0), BACKGROUND (-1) or IGNORE (-2).
    """
    _check_match_args(anchors, gt_boxes, fg_iou, bg_iou, gt_is_crowd)
    dtype = torch.promote_types(anchors.dtype, gt_boxes.dtype)
    anchors, gt_boxes = anchors.to(dtype), gt_boxes.to(dtype)
    if gt_is_crowd is None:  # every box is a target; no host-device sync on this path
        crowd, targets = None, gt_boxes
    else:
        crowd = gt_is_crowd.bool()
        target_index = torch.nonzero(~crowd).squeeze(1)  # position among targets -> index into gt_boxes
        targets = gt_boxes[target_index]

    matches = torch.full((anchors.shape[0],), BACKGROUND, dtype=torch.int64, device=anchors.device)
    if targets.shape[0] > 0 and anchors.shape[0] > 0:
        best_iou, best_gt, gt_best_iou = _best_gt_per_anchor(anchors, targets, chunk_elements)
        gt_of_anchor = best_gt if crowd is None else target_index[best_gt]
        matches = torch.where(best_iou >= fg_iou, gt_of_anchor, matches)
        matches = torch.where((best_iou >= bg_iou) & (best_iou < fg_iou), IGNORE, matches)
        if allow_low_quality:
            low = _low_quality_anchors(anchors, targets, gt_best_iou, chunk_elements)
            matches = torch.where(low, gt_of_anchor, matches)
    if crowd is not None and bool(crowd.any()) and anchors.shape[0] > 0:
        covered = _covered_by_crowd(anchors, gt_boxes[crowd], crowd_ioa, chunk_elements)
        matches = torch.where(covered & (matches < 0), IGNORE, matches)
    return matches


def atss_match_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    num_per_level: Sequence[int],
    topk: int = 9,
    anchors_per_location: int = 1,
    gt_is_crowd: Tensor | None = None,
    chunk_elements: int = 4_000_000,
    crowd_ioa: float = 0.5,
) -> Tensor:
    """The gt box each anchor of one image is assigned to by ATSS's adaptive threshold.

    For each box: on every level the topk * anchors_per_location anchors whose centres are nearest its centre are
    candidates; the threshold is the mean plus the (unbiased) standard deviation of the candidates' IoU with it;
    candidates at or above it whose centre lies inside the box are positive. An anchor positive for several boxes
    goes to the one it overlaps most. Every other anchor is background (ATSS ignores none), except those covered by a
    crowd region (as `match_anchors`).

    Args:
        anchors: [A, 4] float XYXY, level after level as `AnchorGenerator` lays them out.
        gt_boxes: [G, 4] float XYXY (G may be 0).
        num_per_level: the number of anchors of each level (summing to A).
        topk, anchors_per_location: candidates per level and box (ATSS: 9 locations' anchors).
        gt_is_crowd, chunk_elements, crowd_ioa: as `match_anchors`; the result does not depend on chunk_elements.
    Returns:
        [A] int64: the assigned index into gt_boxes (>= 0), BACKGROUND (-1) or IGNORE (-2).
    """
    _check_match_args(anchors, gt_boxes, 0.0, 0.0, gt_is_crowd)
    if sum(num_per_level) != anchors.shape[0]:
        raise ValueError(
            f"num_per_level {list(num_per_level)} sums to {sum(num_per_level)}, not the {anchors.shape[0]} anchors"
        )
    dtype = torch.promote_types(anchors.dtype, gt_boxes.dtype)
    anchors, gt_boxes = anchors.to(dtype), gt_boxes.to(dtype)
    crowd = None if gt_is_crowd is None else gt_is_crowd.bool()
    target_index = torch.arange(gt_boxes.shape[0], device=anchors.device)
    if crowd is not None:
        target_index = torch.nonzero(~crowd).squeeze(1)
    targets = gt_boxes[target_index]
    matches = torch.full((anchors.shape[0],), BACKGROUND, dtype=torch.int64, device=anchors.device)
    if targets.shape[0] > 0 and anchors.shape[0] > 0:
        candidates = _nearest_per_level(anchors, targets, num_per_level, topk * anchors_per_location, chunk_elements)
        g, k = candidates.shape
        iou = paired_iou(targets[:, None].expand(g, k, 4).reshape(-1, 4), anchors[candidates.reshape(-1)]).view(g, k)
        spread = iou.std(dim=1, keepdim=True) if k > 1 else torch.zeros_like(iou[:, :1])
        centres = (anchors[candidates, :2] + anchors[candidates, 2:]) / 2  # [G, K, 2]
        inside = ((centres > targets[:, None, :2]) & (centres < targets[:, None, 2:])).all(dim=2)
        positive = (iou >= iou.mean(dim=1, keepdim=True) + spread) & inside
        # each anchor to the box it overlaps most among those it is positive for: scatters, no host-device sync
        score = torch.where(positive, iou, iou.new_tensor(-1.0)).reshape(-1)
        flat = candidates.reshape(-1)
        best = iou.new_full((anchors.shape[0],), -1.0).scatter_reduce(0, flat, score, "amax")
        owner = torch.where(
            positive.reshape(-1) & (score == best[flat]), target_index[:, None].expand(g, k).reshape(-1), -1
        )
        winner = torch.full_like(matches, -1).scatter_reduce(0, flat, owner, "amax")
        matches = torch.where(winner >= 0, winner, matches)
    if crowd is not None and bool(crowd.any()) and anchors.shape[0] > 0:
        covered = _covered_by_crowd(anchors, gt_boxes[crowd], crowd_ioa, chunk_elements)
        matches = torch.where(covered & (matches < 0), IGNORE, matches)
    return matches


def _nearest_per_level(
    anchors: Tensor, targets: Tensor, num_per_level: Sequence[int], k: int, chunk_elements: int
) -> Tensor:
    """[G, sum_l min(k, n_l)] int64: per box, the indices of the k anchors of each level whose centres are nearest
    its centre (boxes in chunks, so that at most about chunk_elements distances exist at once)."""
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    box_centres = (targets[:, :2] + targets[:, 2:]) / 2
    per_level, start = [], 0
    for n in num_per_level:
        if n == 0:
            continue
        centres, nearest = anchor_centres[start : start + n], []
        step = max(1, chunk_elements // n)
        for rows in range(0, targets.shape[0], step):
            distance = torch.cdist(box_centres[rows : rows + step], centres)  # [g, n]
            nearest.append(distance.topk(min(k, n), dim=1, largest=False).indices + start)
        per_level.append(torch.cat(nearest))
        start += n
    return torch.cat(per_level, dim=1)


def anchor_counts(matches: Tensor, anchors: Tensor, gt_boxes: Tensor, fg_iou: float) -> tuple[Tensor, Tensor]:
    """How many anchors the matcher gave each gt box: (at IoU >= fg_iou [G] int64, in all [G] int64).

    matches: [A] int64 from `match_anchors` (gt index >= 0, or negative); anchors: [A, 4]; gt_boxes: [G, 4] float
    XYXY. Gathers and a scatter-add, no host-device sync, so the training loss can count uncovered boxes freely."""
    gt = matches.clamp(min=0)
    assigned = matches >= 0
    if gt_boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=matches.device)
        return empty, empty
    dtype = torch.promote_types(anchors.dtype, gt_boxes.dtype)
    good = assigned & (paired_iou(gt_boxes.to(dtype)[gt], anchors.to(dtype)) >= fg_iou)
    zeros = torch.zeros(gt_boxes.shape[0], dtype=torch.int64, device=matches.device)
    return zeros.scatter_add(0, gt, good.long()), zeros.scatter_add(0, gt, assigned.long())


class BoxCoder:
    """Box regression targets relative to anchors, as in R-CNN, Detectron and torchvision (no +1 in widths).

        dx = wx (gx - ax) / aw,  dy = wy (gy - ay) / ah,  dw = ww log(gw / aw),  dh = wh log(gh / ah)

    with (x, y) the centre and (w, h) = (x2 - x1, y2 - y1) of the gt box g and the anchor a.
    `clamp` caps the unweighted dw / ww and dh / wh before exp when decoding, so a wild prediction cannot overflow.
    float16/bfloat16 inputs are computed, and returned, in float32.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), clamp: float = math.log(1000.0 / 16)) -> None:
        if len(weights) != 4 or any(not w > 0 for w in weights):
            raise ValueError(f"weights must be 4 positive numbers (wx, wy, ww, wh), got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = float(clamp)

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights

    def encode(self, anchors: Tensor, boxes: Tensor) -> Tensor:
        """Deltas that turn each anchor into its box. anchors, boxes: [N, 4] float XYXY; returns [N, 4] float."""
        if anchors.shape != boxes.shape or anchors.shape[-1:] != (4,):
            raise ValueError(
                f"anchors and boxes must both be [N, 4], got {tuple(anchors.shape)} and {tuple(boxes.shape)}"
            )
        dtype = torch.promote_types(torch.promote_types(anchors.dtype, boxes.dtype), torch.float32)
        ax, ay, aw, ah = self._centre_size(anchors.to(dtype))
        gx, gy, gw, gh = self._centre_size(boxes.to(dtype))
        wx, wy, ww, wh = self.weights
        dx = wx * (gx - ax) / aw
        dy = wy * (gy - ay) / ah
        dw = ww * torch.log(gw / aw)
        dh = wh * torch.log(gh / ah)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes from predicted deltas. deltas, anchors: [N, 4] float; returns [N, 4] float XYXY (unclipped)."""
        if deltas.shape != anchors.shape or deltas.shape[-1:] != (4,):
            raise ValueError(
                f"deltas and anchors must both be [N, 4], got {tuple(deltas.shape)} and {tuple(anchors.shape)}"
            )
        dtype = torch.promote_types(deltas.dtype, torch.float32)
        deltas = deltas.to(dtype)
        ax, ay, aw, ah = self._centre_size(anchors.to(dtype))
        wx, wy, ww, wh = self.weights
        dw = torch.clamp(deltas[..., 2] / ww, max=self.clamp)
        dh = torch.clamp(deltas[..., 3] / wh, max=self.clamp)
        cx = deltas[..., 0] / wx * aw + ax
        cy = deltas[..., 1] / wy * ah + ay
        half_w = 0.5 * (torch.exp(dw) * aw)
        half_h = 0.5 * (torch.exp(dh) * ah)
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)
