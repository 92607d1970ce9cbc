"""COCO evaluation of detections (pycocotools), per-class AP and precision-recall curves.

Inputs are the plain per-image dicts of retinanet.data.coco_format:

    ground truth  {"image_id": int, "boxes": [N, 4] float XYXY (original image pixels), "labels": [N] int64 in
                   0..K-1, "iscrowd": [N] bool (optional), "width": int, "height": int}
    detection     {"image_id": int, "boxes": [M, 4] float XYXY, "scores": [M] float, "labels": [M] int64 in 0..K-1}
    categories    [{"id": int, "name": str}] * K; contiguous label i is categories[i]

COCO numbers come from pycocotools' COCOeval run in memory. Where pycocotools reports -1 ("no ground truth in this
class / area range, the value is undefined") this module reports float("nan"), so a mean over classes or a plot can
skip it with nanmean instead of being pulled down by a -1.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from retinanet.data.coco_format import Category, Target, check_image_ids, coco_ground_truth, coco_results
from retinanet.runtime.outputs import save_figure

__all__ = ["CocoMetrics", "evaluate_coco", "max_dets_for", "plot_pr_curves"]

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
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR1",
        "AR10",
        "AR100",
        "ARs",
        "ARm",
        "ARl",
    )

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
    return _coco_from_dict(
        {
            "images": list(coco_gt.dataset["images"]),
            "annotations": [],
            "categories": list(coco_gt.dataset["categories"]),
        }
    )


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
    aps = [
        precision[:, :, :, a["all"], m[max_dets]],
        precision[[t50], :, :, a["all"], m[max_dets]],
        precision[[t75], :, :, a["all"], m[max_dets]],
    ]
    aps += [precision[:, :, :, a[s], m[max_dets]] for s in ("small", "medium", "large")]
    ars = [recall[:, :, a["all"], m[d]] for d in (1, 10, max_dets)]
    ars += [recall[:, :, a[s], m[max_dets]] for s in ("small", "medium", "large")]
    return [_mean_defined(s) for s in aps + ars]


def max_dets_for(gts: Sequence[Target], least: int = 100) -> int:
    """The detections per image an evaluation counts: COCO's 100, or the most objects an image holds (dense scenes)."""
    return max([least, *(len(g["boxes"]) for g in gts)])


def evaluate_coco(
    gts: Sequence[Target],
    detections: Sequence[Target],
    categories: Sequence[Category],
    max_dets: int = 100,
    verbose: bool = False,
) -> CocoMetrics:
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
    check_image_ids([image["id"] for image in gt_dict["images"]], [int(det["image_id"]) for det in detections])
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
    return CocoMetrics(
        *stats,
        per_class_ap=per_class,
        precision=precision,
        iou_thresholds=np.asarray(params.iouThrs),
        recall_thresholds=np.asarray(params.recThrs),
        category_names=names,
        max_dets_list=list(params.maxDets),
    )


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
    return save_figure(fig, path)


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
