"""Test-time augmentation's geometry and its fusion: the views of an image (flips and turns by 90 degrees, the
symmetries of a square that change nothing for objects seen from above), the map of a view's boxes back to the
image, and the fusion of every view's detections into one set by score-weighted box averaging (weighted boxes
fusion, Solovyev et al. 2021).

A view is (turns, flip): the image is flipped left-right first when `flip`, then turned by `turns` x 90 degrees
counter-clockwise (torch.rot90). Boxes are float [N, 4] XYXY pixels throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from retinanet.ops.postprocess import Detections

__all__ = ["TTA_VIEWS", "View", "boxes_to_view", "boxes_from_view", "fuse_detections", "view_image"]

View = tuple[int, bool]  # (turns by 90 degrees counter-clockwise, flipped left-right first)
# named sets of views: the identity first
TTA_VIEWS: dict[str, tuple[View, ...]] = {
    "flips": ((0, False), (0, True), (2, True)),  # as is, left-right, top-bottom (a half turn after left-right)
    "turns": ((0, False), (1, False), (2, False), (3, False)),
    "d4": tuple((k, f) for f in (False, True) for k in range(4)),  # all eight symmetries of a square
}


def view_image(image: Tensor, view: View) -> Tensor:
    """[C, H, W] image as `view` sees it."""
    turns, flip = view
    image = image.flip(-1) if flip else image
    return torch.rot90(image, turns, dims=(-2, -1)) if turns % 4 else image


def _turn(boxes: Tensor, size_hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Boxes of an image of size_hw turned by 90 degrees counter-clockwise: a point (x, y) goes to (y, W - x)."""
    _, w = size_hw
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((y1, w - x2, y2, w - x1), -1), (size_hw[1], size_hw[0])


def boxes_to_view(boxes: Tensor, view: View, size_hw: tuple[int, int]) -> Tensor:
    """Boxes of an image of size_hw (H, W) in the pixels of its `view`."""
    turns, flip = view
    if flip:
        x1, y1, x2, y2 = boxes.unbind(-1)
        boxes = torch.stack((size_hw[1] - x2, y1, size_hw[1] - x1, y2), -1)
    for _ in range(turns % 4):
        boxes, size_hw = _turn(boxes, size_hw)
    return boxes


def boxes_from_view(boxes: Tensor, view: View, size_hw: tuple[int, int]) -> Tensor:
    """Boxes found in the `view` of an image of size_hw (H, W, the image's own), back in the image's pixels."""
    turns, flip = view
    turned = size_hw if turns % 2 == 0 else (size_hw[1], size_hw[0])  # the view's size
    for _ in range((4 - turns) % 4):  # the remaining turns bring the view back upright
        boxes, turned = _turn(boxes, turned)
    if flip:
        x1, y1, x2, y2 = boxes.unbind(-1)
        boxes = torch.stack((size_hw[1] - x2, y1, size_hw[1] - x1, y2), -1)
    return boxes


def fuse_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, num_views: int, iou_thresh: float = 0.55, max_detections: int = 100
) -> Detections:
    """One set of detections from those of `num_views` views of an image (all in its pixels), by weighted boxes
    fusion: boxes of a class that overlap by more than iou_thresh form a cluster around its highest-scoring box (a
    class-wise NMS picks the clusters); a cluster's box is its boxes' score-weighted mean, its score their mean
    score times min(size, num_views) / num_views, so that what one view alone saw counts less. Vectorised: one NMS,
    one IoU matrix of the clusters' heads against every box, scatter-adds.

    boxes [N, 4] float XYXY, scores [N] float, labels [N] int64 -> Detections by decreasing score, at most
    max_detections."""
    if boxes.shape[0] == 0:
        return Detections(boxes, scores, labels)
    heads = batched_nms(boxes, scores, labels, iou_thresh)  # by decreasing score
    k = heads.shape[0]
    iou = box_iou(boxes[heads], boxes).nan_to_num(0.0)  # [K, N]; a box of no area overlaps nothing
    iou = iou.masked_fill(labels[heads][:, None] != labels[None, :], -1.0)
    iou[torch.arange(k), heads] = 2.0  # a head is its own cluster's, even one of no area
    # each box joins the head it overlaps most: NMS removed a box only for a head above iou_thresh
    cluster = iou.argmax(dim=0)
    weight = scores.new_zeros(k).index_add_(0, cluster, scores)
    fused = boxes.new_zeros(k, 4).index_add_(0, cluster, boxes * scores[:, None]) / weight.clamp_min(1e-12)[:, None]
    size = torch.bincount(cluster, minlength=k).to(scores.dtype)
    fused_scores = weight / size * size.clamp(max=num_views) / num_views
    order = fused_scores.argsort(descending=True)[:max_detections]
    return Detections(fused[order], fused_scores[order], labels[heads][order])
