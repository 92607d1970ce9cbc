"""COCO and VOC evaluation of detections.

Inputs are plain per-image dicts, so this module needs nothing else from the package:

    ground truth  {"image_id": int, "boxes": [N, 4] float XYXY (original image pixels), "labels": [N] int64 in
                   0..K-1, "iscrowd": [N] bool (optional), "width": int, "height": int}
    detection     {"image_id": int, "boxes": [M, 4] float XYXY, "scores": [M] float, "labels": [M] int64 in 0..K-1}
    categories    [{"id": int, "name": str}] * K; contiguous label i is categories[i]

COCO numbers come from pycocotools' COCOeval run in memory. Where pycocotools reports -1 ("no ground truth in this
class / area range, the value is undefined") this module reports float("nan"), so a mean over classes or a plot can
skip it with nanmean instead of being pulled down by a -1.

VOC numbers are computed here: per class, detections by descending score, each matched to the ground-truth box it
overlaps most; all-point interpolated AP (VOC2010+) or the 11-point AP of VOC2007.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["CocoMetrics", "average_precision", "coco_ground_truth", "coco_results", "evaluate_coco", "evaluate_voc",
           "max_dets_for", "plot_pr_curves", "save_coco_results"]

Target = Mapping[str, Any]
Category = Mapping[str, Any]

# --------------------------------------------------------------------------------------------------------------
# Edge checks: everything that enters from outside is validated once, here, with the index of the offending image.


def _as_boxes(value: Any, where: str) -> Tensor:
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


def _as_vector(value: Any, n: int, where: str, dtype: torch.dtype) -> Tensor:
    vector = torch.as_tensor(value).detach().cpu().reshape(-1)
    if vector.numel() != n:
        raise ValueError(f"{where}: expected {n} values (one per box), got {vector.numel()}")
    return vector.to(dtype)


def _check_labels(labels: Tensor, num_classes: int, where: str) -> Tensor:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"{where}: labels must lie in 0..{num_classes - 1}, got {int(labels[bad][0])}")
    return labels


def _ground_truth(gt: Target, index: int, num_classes: int) -> dict[str, Any]:
    """One image's ground truth, validated: boxes [N, 4] float64, labels [N] int64, iscrowd [N] bool."""
    where = f"gts[{index}]"
    for key in ("image_id", "boxes", "labels"):
        if key not in gt:
            raise ValueError(f"{where}: missing key {key!r}; expected image_id, boxes, labels, width, height")
    boxes = _as_boxes(gt["boxes"], f"{where}['boxes']")
    labels = _as_vector(gt["labels"], len(boxes), f"{where}['labels']", torch.int64)
    crowd = gt.get("iscrowd")
    iscrowd = torch.zeros(len(boxes), dtype=torch.bool) if crowd is None else _as_vector(
        crowd, len(boxes), f"{where}['iscrowd']", torch.bool)
    return {"image_id": int(gt["image_id"]), "boxes": boxes, "iscrowd": iscrowd,
            "labels": _check_labels(labels, num_classes, f"{where}['labels']")}


def _detection(det: Target, index: int, num_classes: int) -> dict[str, Any]:
    """One image's detections, validated: boxes [M, 4] float64, scores [M] float64, labels [M] int64."""
    where = f"detections[{index}]"
    for key in ("image_id", "boxes", "scores", "labels"):
        if key not in det:
            raise ValueError(f"{where}: missing key {key!r}; expected image_id, boxes, scores, labels")
    boxes = _as_boxes(det["boxes"], f"{where}['boxes']")
    scores = _as_vector(det["scores"], len(boxes), f"{where}['scores']", torch.float64)
    labels = _as_vector(det["labels"], len(boxes), f"{where}['labels']", torch.int64)
    return {"image_id": int(det["image_id"]), "boxes": boxes, "scores": scores,
            "labels": _check_labels(labels, num_classes, f"{where}['labels']")}


def _check_categories(categories: Sequence[Category]) -> list[dict[str, Any]]:
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


def _check_image_ids(gt_ids: Sequence[int], det_ids: Sequence[int]) -> None:
    if len(set(gt_ids)) != len(gt_ids):
        raise ValueError("gts: image_id values must be unique (one entry per image)")
    known = set(gt_ids)
    for i, image_id in enumerate(det_ids):
        if image_id not in known:
            raise ValueError(f"detections[{i}]: image_id {image_id} has no entry in gts")


def _xyxy_to_xywh(boxes: Tensor) -> list[list[float]]:
    """boxes: [N, 4] float64 XYXY -> COCO [x, y, w, h] per box, as Python floats."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


# --------------------------------------------------------------------------------------------------------------
# COCO files in and out: the only place where boxes_xywh exist.


def coco_ground_truth(gts: Sequence[Target], categories: Sequence[Category]) -> dict[str, Any]:
    """A COCO instances dict (images, annotations, categories) of the ground truth.

    gts: per-image dicts, boxes [N, 4] float XYXY in original pixels, labels [N] int64 in 0..K-1, optional
        iscrowd [N] bool, width and height int. categories: K dicts {"id", "name"}; label i -> categories[i]["id"].
    Annotations get bbox [x, y, w, h], area w * h, iscrowd 0/1 and ids 1, 2, ... (pycocotools takes id 0 for
    "unmatched", so ids start at 1).
    """
    categories = _check_categories(categories)
    images, annotations = [], []
    for i, raw in enumerate(gts):
        if "width" not in raw or "height" not in raw:
            raise ValueError(f"gts[{i}]: missing 'width'/'height' (original image size in pixels)")
        gt = _ground_truth(raw, i, len(categories))
        images.append({"id": gt["image_id"], "width": int(raw["width"]), "height": int(raw["height"])})
        rows = zip(_xyxy_to_xywh(gt["boxes"]), gt["labels"].tolist(), gt["iscrowd"].tolist())
        for bbox, label, crowd in rows:
            annotations.append({"id": len(annotations) + 1, "image_id": gt["image_id"], "bbox": bbox,
                                "category_id": categories[label]["id"], "area": bbox[2] * bbox[3],
                                "iscrowd": int(crowd)})
    return {"info": {"description": "retinanet ground truth"}, "images": images, "annotations": annotations,
            "categories": categories}


def coco_results(detections: Sequence[Target], categories: Sequence[Category]) -> list[dict[str, Any]]:
    """Detections in the COCO results format: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}].

    detections: per-image dicts, boxes [M, 4] float XYXY, scores [M] float, labels [M] int64 in 0..K-1.
    category_id is the original id, categories[label]["id"]. The order within each image is kept.
    """
    categories = _check_categories(categories)
    results = []
    for i, raw in enumerate(detections):
        det = _detection(raw, i, len(categories))
        rows = zip(_xyxy_to_xywh(det["boxes"]), det["scores"].tolist(), det["labels"].tolist())
        for bbox, score, label in rows:
            results.append({"image_id": det["image_id"], "category_id": categories[label]["id"], "bbox": bbox,
                            "score": score})
    return results


def save_coco_results(detections: Sequence[Target], categories: Sequence[Category], path: str | Path) -> Path:
    """Write `coco_results(detections, categories)` as JSON to `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_results(detections, categories)))
    return path


# --------------------------------------------------------------------------------------------------------------
# COCO metrics via pycocotools.


@dataclass
class CocoMetrics:
    """COCO box metrics. NaN where pycocotools reports -1 (no ground truth in that class or area range).

    AP..ARl: COCOeval's 12 summary numbers; AR100, ARs, ARm, ARl and all AP use `max_dets` detections per image.
    per_class_ap: category name -> AP over IoU .50:.95, all areas, max_dets.
    precision: [T, R, K, A, M] float, COCOeval's eval["precision"] (-1 kept where undefined); T = iou_thresholds,
        R = recall_thresholds, K = category_names (sorted by original id, pycocotools' order), A = all/small/
        medium/large, M = max_dets_list.
    """

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    AR1: float
    AR10: float
    AR100: float
    ARs: float
    ARm: float
    ARl: float
    per_class_ap: dict[str, float]
    precision: np.ndarray = field(repr=False)
    iou_thresholds: np.ndarray = field(repr=False)
    recall_thresholds: np.ndarray = field(repr=False)
    category_names: list[str] = field(repr=False)
    max_dets_list: list[int] = field(repr=False)

    STAT_NAMES: ClassVar[tuple[str, ...]] = (
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

    @property
    def stats(self) -> list[float]:
        """The 12 summary numbers in COCOeval.stats order (NaN for -1)."""
        return [getattr(self, name) for name in self.STAT_NAMES]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the 12 numbers and {"per_class_ap": {name: AP}} (arrays left out)."""
        summary: dict[str, Any] = dict(zip(self.STAT_NAMES, self.stats))
        summary["per_class_ap"] = dict(self.per_class_ap)
        if self.max_dets_list[-1] != 100:  # AR100 and every AP then count this many detections per image
            summary["max_dets"] = self.max_dets_list[-1]
        return summary


def _coco_from_dict(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _coco_detections(coco_gt: Any, results: list[dict[str, Any]]) -> Any:
    # loadRes indexes results[0], so an empty result list gets an empty results COCO built by hand instead;
    # COCOeval then scores it as pycocotools would score "no detections": 0 where there is ground truth.
    if results:
        return coco_gt.loadRes(results)
    return _coco_from_dict({"images": list(coco_gt.dataset["images"]), "annotations": [],
                            "categories": list(coco_gt.dataset["categories"])})


def _mean_defined(values: np.ndarray) -> float:
    """Mean over the entries > -1 (pycocotools' rule); NaN instead of -1 when there are none."""
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else math.nan


def _summary_stats(eval_result: dict[str, Any], params: Any, max_dets: int) -> list[float]:
    """COCOeval.summarize's 12 numbers, read at `max_dets` (summarize itself hard-codes 100 for AP)."""
    precision, recall = eval_result["precision"], eval_result["recall"]
    t50, t75 = (int(np.where(np.isclose(params.iouThrs, t))[0][0]) for t in (0.5, 0.75))
    m = {d: params.maxDets.index(d) for d in (1, 10, max_dets)}
    a = {name: params.areaRngLbl.index(name) for name in ("all", "small", "medium", "large")}
    aps = [precision[:, :, :, a["all"], m[max_dets]], precision[[t50], :, :, a["all"], m[max_dets]],
           precision[[t75], :, :, a["all"], m[max_dets]]]
    aps += [precision[:, :, :, a[s], m[max_dets]] for s in ("small", "medium", "large")]
    ars = [recall[:, :, a["all"], m[d]] for d in (1, 10, max_dets)]
    ars += [recall[:, :, a[s], m[max_dets]] for s in ("small", "medium", "large")]
    return [_mean_defined(s) for s in aps + ars]


def max_dets_for(gts: Sequence[Target], least: int = 100) -> int:
    """The detections per image an evaluation counts: COCO's 100, or the most objects an image holds (dense scenes)."""
    return max([least, *(len(g["boxes"]) for g in gts)])


def evaluate_coco(gts: Sequence[Target], detections: Sequence[Target], categories: Sequence[Category],
                  max_dets: int = 100, verbose: bool = False) -> CocoMetrics:
    """COCO box AP/AR of `detections` against `gts` with pycocotools' COCOeval, all in memory.

    gts / detections / categories: as in the module docstring (boxes [N, 4] float XYXY in original pixels).
    Every detection's image_id must appear in gts; images without detections are scored as having none.
    max_dets (>= 10): detections kept per image and class; the M axis is [1, 10, max_dets].
    verbose: let pycocotools print its progress and the summary table.
    """
    from pycocotools.cocoeval import COCOeval

    if max_dets < 10:
        raise ValueError(f"evaluate_coco: max_dets must be >= 10 (AR10 needs it), got {max_dets}")
    gt_dict, results = coco_ground_truth(gts, categories), coco_results(detections, categories)
    _check_image_ids([image["id"] for image in gt_dict["images"]], [int(det["image_id"]) for det in detections])
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = _coco_from_dict(gt_dict)
        evaluator = COCOeval(coco_gt, _coco_detections(coco_gt, results), iouType="bbox")
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        if verbose and max_dets == 100:
            evaluator.summarize()  # its table hard-codes maxDets=100 for AP
    return _coco_metrics(evaluator, coco_gt, max_dets)


def _coco_metrics(evaluator: Any, coco_gt: Any, max_dets: int) -> CocoMetrics:
    params, precision = evaluator.params, evaluator.eval["precision"]
    names = [coco_gt.cats[cat_id]["name"] for cat_id in params.catIds]
    last = params.maxDets.index(max_dets)
    per_class = {name: _mean_defined(precision[:, :, k, 0, last]) for k, name in enumerate(names)}
    stats = _summary_stats(evaluator.eval, params, max_dets)
    return CocoMetrics(*stats, per_class_ap=per_class, precision=precision, iou_thresholds=np.asarray(params.iouThrs),
                       recall_thresholds=np.asarray(params.recThrs), category_names=names,
                       max_dets_list=list(params.maxDets))


# --------------------------------------------------------------------------------------------------------------
# Precision-recall curves.


def plot_pr_curves(metrics: CocoMetrics, path: str | Path, iou: float | Sequence[float] = 0.5) -> Path:
    """Save a PNG of per-class precision-recall curves (all areas, max_dets), one panel per IoU threshold.

    iou: one threshold or several (e.g. (0.5, 0.75)); each must be one of metrics.iou_thresholds.
    Classes without ground truth are left out; the legend gives each class's AP at that IoU.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no pyplot global state

    ious = [float(iou)] if isinstance(iou, (int, float)) else [float(t) for t in iou]
    fig = Figure(figsize=(7 * len(ious), 6), layout="constrained")
    for ax, threshold in zip(fig.subplots(1, len(ious), squeeze=False)[0], ious):
        _draw_pr_panel(ax, metrics, threshold)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _draw_pr_panel(ax: Any, metrics: CocoMetrics, iou: float) -> None:
    match = np.where(np.isclose(metrics.iou_thresholds, iou))[0]
    if match.size == 0:
        raise ValueError(f"plot_pr_curves: iou {iou} is not one of {np.round(metrics.iou_thresholds, 2).tolist()}")
    curves = metrics.precision[match[0], :, :, 0, -1]  # [R, K]
    for k, name in enumerate(metrics.category_names):
        if (curves[:, k] > -1).any():
            ax.plot(metrics.recall_thresholds, curves[:, k], label=f"{name} (AP {_mean_defined(curves[:, k]):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=f"PR curves at IoU {iou:.2f}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small", loc="lower left", ncol=max(1, len(ax.lines) // 20))


# --------------------------------------------------------------------------------------------------------------
# Pascal VOC mAP.


def average_precision(recall: Tensor, precision: Tensor, use_07_metric: bool = False) -> float:
    """VOC AP of one class from its cumulative recall [D] and precision [D] (detections by descending score).

    All-point interpolation (VOC2010+): area under the monotone precision envelope. use_07_metric: VOC2007's
    11-point mean of the best precision at recall >= 0, 0.1, ..., 1.
    """
    recall, precision = recall.to(torch.float64), precision.to(torch.float64)
    if use_07_metric:
        points = [precision[recall >= t].max() if (recall >= t).any() else precision.new_zeros(())
                  for t in torch.linspace(0, 1, 11, dtype=torch.float64)]
        return float(torch.stack(points).mean())
    mrec = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    mpre = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    envelope = mpre.flip(0).cummax(0).values.flip(0)
    return float(((mrec[1:] - mrec[:-1]) * envelope[1:]).sum())


def _voc_class_hits(gts: list[dict[str, Any]], dets: list[dict[str, Any]], label: int,
                    iou_threshold: float) -> tuple[Tensor, Tensor, int]:
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
        hits.append(_voc_image_hits(det["boxes"][keep], det["scores"][keep], gt["boxes"][in_class],
                                    gt["iscrowd"][in_class], iou_threshold))
    if not scores:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int8), num_gt
    return torch.cat(scores), torch.cat(hits), num_gt


def _voc_image_hits(boxes: Tensor, scores: Tensor, gt_boxes: Tensor, difficult: Tensor,
                    iou_threshold: float) -> Tensor:
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


def evaluate_voc(gts: Sequence[Target], detections: Sequence[Target], num_classes: int,
                 iou_threshold: float = 0.5, use_07_metric: bool = False) -> dict[str, Any]:
    """Pascal VOC mAP at `iou_threshold`: {"mAP": float, "per_class": {label: AP}}.

    gts: per-image dicts, boxes [N, 4] float XYXY, labels [N] int64 in 0..num_classes-1, iscrowd [N] bool marks
    VOC "difficult" boxes (neither TP nor FP when matched, not counted in recall). detections: per-image dicts,
    boxes [M, 4], scores [M], labels [M]. IoU is torchvision's box_iou (no +1 pixel convention); a match needs
    IoU >= iou_threshold. per_class AP is NaN for a class without non-difficult gt; mAP averages the other classes
    (NaN if none).
    """
    checked_gts = [_ground_truth(gt, i, num_classes) for i, gt in enumerate(gts)]
    checked_dets = [_detection(det, i, num_classes) for i, det in enumerate(detections)]
    _check_image_ids([gt["image_id"] for gt in checked_gts], [det["image_id"] for det in checked_dets])
    per_class = {label: _voc_class_ap(checked_gts, checked_dets, label, iou_threshold, use_07_metric)
                 for label in range(num_classes)}
    defined = [ap for ap in per_class.values() if not math.isnan(ap)]
    return {"mAP": sum(defined) / len(defined) if defined else math.nan, "per_class": per_class}


def _voc_class_ap(gts: list[dict[str, Any]], dets: list[dict[str, Any]], label: int, iou_threshold: float,
                  use_07_metric: bool) -> float:
    scores, hits, num_gt = _voc_class_hits(gts, dets, label, iou_threshold)
    if num_gt == 0:
        return math.nan
    hits = hits[torch.argsort(scores, descending=True, stable=True)]
    hits = hits[hits >= 0]  # detections of difficult boxes drop out of the ranking entirely
    tp = (hits == 1).cumsum(0).to(torch.float64)
    fp = (hits == 0).cumsum(0).to(torch.float64)
    return average_precision(tp / num_gt, tp / (tp + fp).clamp_min(1e-12), use_07_metric)
