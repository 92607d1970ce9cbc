"""The paper's inference: per level keep scores > thresh and the top k, decode, clip; class-wise NMS; top N."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from retinanet.ops.matching import BoxCoder

__all__ = ["Detections", "postprocess"]


class Detections(NamedTuple):
    """Detections of one image: boxes [N, 4] float XYXY pixels, scores [N] float, labels [N] int64 (0..K-1),
    sorted by decreasing score."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def postprocess(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors_per_level: list[Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_image: int = 100,
) -> list[Detections]:
    """Detections of a batch, in the coordinates of the (resized, unpadded) network input.

    Args:
        cls_logits: [B, sum(HWA), K] float; box_deltas: [B, sum(HWA), 4] float (the head's outputs).
        anchors_per_level: per level [H_l W_l A, 4] float XYXY anchors, in the head's order.
        image_sizes: per image (h, w) of the image inside the padded batch; boxes are clipped to it.
    Returns:
        one Detections per image, at most `detections_per_image` each.
    """
    batch, _, num_classes = cls_logits.shape
    device = cls_logits.device
    boxes_all, scores_all, labels_all, images_all = [], [], [], []
    start = 0
    for anchors in anchors_per_level:
        end = start + anchors.shape[0]
        # all images of the batch at once: top k of each image's level, then the score threshold (the same set as
        # threshold-then-top-k, without a per-image loop)
        top_logits, top_idx = _topk_pairs(cls_logits[:, start:end], topk_candidates)
        k = top_idx.shape[1]
        top_scores = torch.sigmoid(top_logits.float())  # the sigmoid is monotonic: top logits are top scores
        keep = top_scores > score_thresh
        anchor_idx = top_idx // num_classes
        deltas = box_deltas[:, start:end].gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))
        boxes = box_coder.decode(deltas.reshape(-1, 4), anchors[anchor_idx.reshape(-1)]).reshape(batch, k, 4)
        image_idx = torch.arange(batch, device=device).unsqueeze(1).expand(-1, k)
        boxes_all.append(boxes[keep])
        scores_all.append(top_scores[keep])
        labels_all.append((top_idx % num_classes)[keep])
        images_all.append(image_idx[keep])
        start = end
    boxes, scores = torch.cat(boxes_all), torch.cat(scores_all)
    labels, images = torch.cat(labels_all), torch.cat(images_all)
    boxes = _clip_per_image(boxes, images, image_sizes)
    # class-wise NMS of all images in one call: a (image, class) pair is one NMS group
    keep = batched_nms(boxes, scores, images * num_classes + labels, nms_thresh)
    return _split_per_image(boxes[keep], scores[keep], labels[keep], images[keep], batch, detections_per_image)


def _topk_pairs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of the (anchor, class) logits of each image: values [B, k] and flat indices anchor * K + class.

    The same as `logits.reshape(B, -1).topk(k)`, in two cheap steps: the top k pairs all lie in the k anchors whose
    best class is highest (a pair outside them is beaten by the best pair of each of those k anchors), so one pass
    for each anchor's maximum, a top k over anchors, and a top k over the k x K candidates replace a top k over all
    A x K pairs (2.9 million per image at P3 of a 512 x 512 image: about 10x faster on a CPU)."""
    batch, num_anchors, num_classes = logits.shape
    k = min(k, num_anchors * num_classes)
    if num_anchors <= k:
        return logits.reshape(batch, -1).topk(k, dim=1)
    anchors = logits.amax(dim=2).topk(k, dim=1).indices  # [B, k]
    candidates = logits.gather(1, anchors.unsqueeze(-1).expand(-1, -1, num_classes)).reshape(batch, -1)
    values, idx = candidates.topk(k, dim=1)
    return values, anchors.gather(1, idx // num_classes) * num_classes + idx % num_classes


def _clip_per_image(boxes: Tensor, images: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
    sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)[images]  # [N, 2] (h, w)
    x = boxes[:, 0::2].clamp(min=0).minimum(sizes[:, 1:2])
    y = boxes[:, 1::2].clamp(min=0).minimum(sizes[:, 0:1])
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def _split_per_image(
    boxes: Tensor, scores: Tensor, labels: Tensor, images: Tensor, batch: int, limit: int
) -> list[Detections]:
    # batched_nms returns indices by decreasing score; a stable sort by image keeps that order within each image,
    # and one bincount (one host sync for the batch) gives where each image's run starts
    order = torch.sort(images, stable=True).indices
    counts = torch.bincount(images, minlength=batch).tolist()
    out = []
    for sel in order.split(counts):
        sel = sel[:limit]
        out.append(Detections(boxes[sel], scores[sel], labels[sel]))
    return out
