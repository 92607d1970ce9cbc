"""Pascal VOC mAP of detections, computed here: per class, detections by descending score, each matched to the
ground-truth box it overlaps most; all-point interpolated AP (VOC2010+) or the 11-point AP of VOC2007. Inputs are
the plain per-image dicts of retinanet.data.coco_format."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from retinanet.data.coco_format import Target, check_image_ids, checked_detection, checked_ground_truth

__all__ = ["average_precision", "evaluate_voc"]


def average_precision(recall: Tensor, precision: Tensor, use_07_metric: bool = False) -> float:
    """VOC AP of one class from its cumulative recall [D] and precision [D] (detections by descending score).

    All-point interpolation (VOC2010+): area under the monotone precision envelope. use_07_metric: VOC2007's
    11-point mean of the best precision at recall >= 0, 0.1, ..., 1.
    """
    recall, precision = recall.to(torch.float64), precision.to(torch.float64)
    if use_07_metric:
        points = [
            precision[recall >= t].max() if (recall >= t).any() else precision.new_zeros(())
            for t in torch.linspace(0, 1, 11, dtype=torch.float64)
        ]
        return float(torch.stack(points).mean())
    mrec = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    mpre = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    envelope = mpre.flip(0).cummax(0).values.flip(0)
    return float(((mrec[1:] - mrec[:-1]) * envelope[1:]).sum())


def _voc_class_hits(
    gts: list[dict[str, Any]], dets: list[dict[str, Any]], label: int, iou_threshold: float
) -> tuple[Tensor, Tensor, int]:
    """One class: (scores [D], hit [D] int8 with 1 TP / 0 FP / -1 ignored, number of non-difficult gts)."""
    gt_by_image = {gt["image_id"]: gt for gt in gts}
    scores, hits, num_gt = [], [], 0
    for gt in gts:
        num_gt += int((~gt["iscrowd"][gt["labels"] == label]).sum())
    for det in dets:
        keep = det["labels"] == label
        gt = gt_by_image[det["image_id"]]
        in_class = gt["labels"] == label
        scores.append(det["scores"][keep])
        hits.append(
            _voc_image_hits(
                det["boxes"][keep], det["scores"][keep], gt["boxes"][in_class], gt["iscrowd"][in_class], iou_threshold
            )
        )
    if not scores:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int8), num_gt
    return torch.cat(scores), torch.cat(hits), num_gt


def _voc_image_hits(boxes: Tensor, scores: Tensor, gt_boxes: Tensor, difficult: Tensor, iou_threshold: float) -> Tensor:
    """One image and class, detections in their given order: hit [M] int8, 1 TP / 0 FP / -1 on a difficult gt.

    As in the VOC devkit, each detection (by descending score) goes to the gt it overlaps most; a second
    detection of an already-found gt is a false positive, one whose best gt is difficult is ignored.
    """
    hits = torch.zeros(len(boxes), dtype=torch.int8)
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return hits
    iou = box_iou(boxes, gt_boxes)  # [M, G]
    best_iou, best_gt = iou.max(dim=1)
    found = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for d in torch.argsort(scores, descending=True, stable=True).tolist():
        g = int(best_gt[d])
        if best_iou[d] < iou_threshold:
            continue
        if difficult[g]:
            hits[d] = -1
        elif not found[g]:
            hits[d], found[g] = 1, True
    return hits


def evaluate_voc(
    gts: Sequence[Target],
    detections: Sequence[Target],
    num_classes: int,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
) -> dict[str, Any]:
    """Pascal VOC mAP at `iou_threshold`: {"mAP": float, "per_class": {label: AP}}.

    gts: per-image dicts, boxes [N, 4] float XYXY, labels [N] int64 in 0..num_classes-1, iscrowd [N] bool marks
    VOC "difficult" boxes (neither TP nor FP when matched, not counted in recall). detections: per-image dicts,
    boxes [M, 4], scores [M], labels [M]. IoU is torchvision's box_iou (no +1 pixel convention); a match needs
    IoU >= iou_threshold. per_class AP is NaN for a class without non-difficult gt; mAP averages the other classes
    (NaN if none).
    """
    checked_gts = [checked_ground_truth(gt, i, num_classes) for i, gt in enumerate(gts)]
    checked_dets = [checked_detection(det, i, num_classes) for i, det in enumerate(detections)]
    check_image_ids([gt["image_id"] for gt in checked_gts], [det["image_id"] for det in checked_dets])
    per_class = {
        label: _voc_class_ap(checked_gts, checked_dets, label, iou_threshold, use_07_metric)
        for label in range(num_classes)
    }
    defined = [ap for ap in per_class.values() if not math.isnan(ap)]
    return {"mAP": sum(defined) / len(defined) if defined else math.nan, "per_class": per_class}


def _voc_class_ap(
    gts: list[dict[str, Any]], dets: list[dict[str, Any]], label: int, iou_threshold: float, use_07_metric: bool
) -> float:
    scores, hits, num_gt = _voc_class_hits(gts, dets, label, iou_threshold)
    if num_gt == 0:
        return math.nan
    hits = hits[torch.argsort(scores, descending=True, stable=True)]
    hits = hits[hits >= 0]  # detections of difficult boxes drop out of the ranking entirely
    tp = (hits == 1).cumsum(0).to(torch.float64)
    fp = (hits == 0).cumsum(0).to(torch.float64)
    return average_precision(tp / num_gt, tp / (tp + fp).clamp_min(1e-12), use_07_metric)
