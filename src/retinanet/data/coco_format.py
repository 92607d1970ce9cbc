"""Ground truth and detections as plain per-image dicts, checked where they enter (with the offending image's index),
and COCO's formats of them: the instances dict of a ground truth, the results list of detections (results.json of
`retinanet eval` and `retinanet detect`).

    ground truth  {"image_id": int, "boxes": [N, 4] float XYXY (original image pixels), "labels": [N] int64 in
                   0..K-1, "iscrowd": [N] bool (optional), "width": int, "height": int}
    detection     {"image_id": int, "boxes": [M, 4] float XYXY, "scores": [M] float, "labels": [M] int64 in 0..K-1}
    categories    [{"id": int, "name": str}] * K; contiguous label i is categories[i]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from retinanet.ops.boxes import xyxy_to_xywh
from retinanet.runtime.outputs import atomic_write

__all__ = [
    "Category",
    "Target",
    "as_boxes",
    "as_vector",
    "check_categories",
    "check_image_ids",
    "check_labels",
    "checked_detection",
    "checked_ground_truth",
    "coco_ground_truth",
    "coco_results",
    "save_coco_results",
]

Target = Mapping[str, Any]
Category = Mapping[str, Any]

# --------------------------------------------------------------------------------------------------------------
# Edge checks: everything that enters from outside is validated once, here, with the index of the offending image.


def as_boxes(value: Any, where: str) -> Tensor:
    boxes = torch.as_tensor(value)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).to(torch.float64)
    if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"{where}: expected float boxes [N, 4] XYXY, got {tuple(boxes.shape)} {boxes.dtype}")
    # float64 so that XYXY -> XYWH is exact for any float32 input and the COCO numbers do not depend on rounding
    boxes = boxes.detach().cpu().to(torch.float64)
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes must be finite, got {boxes[~torch.isfinite(boxes).all(1)][0].tolist()}")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{where}: box {i} is not XYXY with x2 >= x1, y2 >= y1: {boxes[i].tolist()}")
    return boxes


def as_vector(value: Any, n: int, where: str, dtype: torch.dtype) -> Tensor:
    vector = torch.as_tensor(value).detach().cpu().reshape(-1)
    if vector.numel() != n:
        raise ValueError(f"{where}: expected {n} values (one per box), got {vector.numel()}")
    return vector.to(dtype)


def check_labels(labels: Tensor, num_classes: int, where: str) -> Tensor:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"{where}: labels must lie in 0..{num_classes - 1}, got {int(labels[bad][0])}")
    return labels


def checked_ground_truth(gt: Target, index: int, num_classes: int) -> dict[str, Any]:
    """One image's ground truth, validated: boxes [N, 4] float64, labels [N] int64, iscrowd [N] bool."""
    where = f"gts[{index}]"
    for key in ("image_id", "boxes", "labels"):
        if key not in gt:
            raise ValueError(f"{where}: missing key {key!r}; expected image_id, boxes, labels, width, height")
    boxes = as_boxes(gt["boxes"], f"{where}['boxes']")
    labels = as_vector(gt["labels"], len(boxes), f"{where}['labels']", torch.int64)
    crowd = gt.get("iscrowd")
    iscrowd = (
        torch.zeros(len(boxes), dtype=torch.bool)
        if crowd is None
        else as_vector(crowd, len(boxes), f"{where}['iscrowd']", torch.bool)
    )
    return {
        "image_id": int(gt["image_id"]),
        "boxes": boxes,
        "iscrowd": iscrowd,
        "labels": check_labels(labels, num_classes, f"{where}['labels']"),
    }


def checked_detection(det: Target, index: int, num_classes: int) -> dict[str, Any]:
    """One image's detections, validated: boxes [M, 4] float64, scores [M] float64, labels [M] int64."""
    where = f"detections[{index}]"
    for key in ("image_id", "boxes", "scores", "labels"):
        if key not in det:
            raise ValueError(f"{where}: missing key {key!r}; expected image_id, boxes, scores, labels")
    boxes = as_boxes(det["boxes"], f"{where}['boxes']")
    scores = as_vector(det["scores"], len(boxes), f"{where}['scores']", torch.float64)
    labels = as_vector(det["labels"], len(boxes), f"{where}['labels']", torch.int64)
    return {
        "image_id": int(det["image_id"]),
        "boxes": boxes,
        "scores": scores,
        "labels": check_labels(labels, num_classes, f"{where}['labels']"),
    }


def check_categories(categories: Sequence[Category]) -> list[dict[str, Any]]:
    checked = []
    for i, category in enumerate(categories):
        if "id" not in category or "name" not in category:
            raise ValueError(f"categories[{i}]: expected {{'id': int, 'name': str}}, got {dict(category)}")
        checked.append({"id": int(category["id"]), "name": str(category["name"])})
    for key in ("id", "name"):
        values = [c[key] for c in checked]
        if len(set(values)) != len(values):
            raise ValueError(f"categories: {key}s must be unique, got {values}")
    return checked


def check_image_ids(gt_ids: Sequence[int], det_ids: Sequence[int]) -> None:
    if len(set(gt_ids)) != len(gt_ids):
        raise ValueError("gts: image_id values must be unique (one entry per image)")
    known = set(gt_ids)
    for i, image_id in enumerate(det_ids):
        if image_id not in known:
            raise ValueError(f"detections[{i}]: image_id {image_id} has no entry in gts")


# --------------------------------------------------------------------------------------------------------------
# COCO's formats out: ground truth as an instances dict, detections as a results list.


def coco_ground_truth(gts: Sequence[Target], categories: Sequence[Category]) -> dict[str, Any]:
    """A COCO instances dict (images, annotations, categories) of the ground truth.

    gts: per-image dicts, boxes [N, 4] float XYXY in original pixels, labels [N] int64 in 0..K-1, optional
        iscrowd [N] bool, width and height int. categories: K dicts {"id", "name"}; label i -> categories[i]["id"].
    Annotations get bbox [x, y, w, h], area w * h, iscrowd 0/1 and ids 1, 2, ... (pycocotools takes id 0 for
    "unmatched", so ids start at 1).
    """
    categories = check_categories(categories)
    images, annotations = [], []
    for i, raw in enumerate(gts):
        if "width" not in raw or "height" not in raw:
            raise ValueError(f"gts[{i}]: missing 'width'/'height' (original image size in pixels)")
        gt = checked_ground_truth(raw, i, len(categories))
        images.append({"id": gt["image_id"], "width": int(raw["width"]), "height": int(raw["height"])})
        rows = zip(xyxy_to_xywh(gt["boxes"]).tolist(), gt["labels"].tolist(), gt["iscrowd"].tolist())
        for bbox, label, crowd in rows:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": gt["image_id"],
                    "bbox": bbox,
                    "category_id": categories[label]["id"],
                    "area": bbox[2] * bbox[3],
                    "iscrowd": int(crowd),
                }
            )
    return {
        "info": {"description": "retinanet ground truth"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def coco_results(detections: Sequence[Target], categories: Sequence[Category]) -> list[dict[str, Any]]:
    """Detections in the COCO results format: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}].

    detections: per-image dicts, boxes [M, 4] float XYXY, scores [M] float, labels [M] int64 in 0..K-1.
    category_id is the original id, categories[label]["id"]. The order within each image is kept.
    """
    categories = check_categories(categories)
    results = []
    for i, raw in enumerate(detections):
        det = checked_detection(raw, i, len(categories))
        rows = zip(xyxy_to_xywh(det["boxes"]).tolist(), det["scores"].tolist(), det["labels"].tolist())
        for bbox, score, label in rows:
            results.append(
                {"image_id": det["image_id"], "category_id": categories[label]["id"], "bbox": bbox, "score": score}
            )
    return results


def save_coco_results(detections: Sequence[Target], categories: Sequence[Category], path: str | Path) -> Path:
    """Write `coco_results(detections, categories)` as JSON to `path` (parents created); returns the path."""
    return atomic_write(path, json.dumps(coco_results(detections, categories)))
