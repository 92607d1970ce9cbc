"""What kind of mistakes a detector makes: TIDE's error decomposition (Bolya et al., "TIDE: A General Toolbox for
Identifying Object Detection Errors", ECCV 2020), from detections and their ground truth.

Per image, detections by decreasing score (at most `max_dets`) are matched greedily to the unmatched ground truth
box of their class with the highest IoU >= the foreground threshold t_f: a true positive. Every other detection is
a false positive of one type, tested in this order:
    loc    its best IoU with a box of its class is in [t_b, t_f]: the right object, badly placed
    cls    its best IoU with a box of another class is >= t_f: the right place, the wrong class
    dupe   its best IoU with a box of its class that a higher-scoring detection took is >= t_f: a duplicate
    bkg    its best IoU with any box is <= t_b (or the image has none): background taken for an object
    both   none of the above: the wrong class and badly placed
and every ground truth box that no detection matched, and that no loc or cls error points at, is `missed`.
Thresholds: t_f = 0.5 (and every COCO threshold 0.5:0.05:0.95 for the averaged figures), t_b = 0.1. Crowd regions
are neither matched nor counted: a detection that lies in one is ignored.

The cost of an error type is TIDE's oracle dAP: the AP gained when the errors of that type alone are fixed - a loc
or cls error becomes the true positive of its box (the highest-scoring one per box; the others are removed), a dupe,
bkg or both error is removed, a missed box is taken out of the ground truth. AP here is TIDE's: per class the
101-point interpolated area under the precision-recall curve over all images, averaged over the classes that have
a detection or a box. Computed overall, per class and per object size (COCO's small < 32^2 px, medium < 96^2, large:
a detection's size is its box's, or its box's when it matched one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from retinanet.ops.boxes import box_ioa

__all__ = ["ERROR_TYPES", "FOREGROUND_IOU", "BACKGROUND_IOU", "ErrorAnalysis", "analyze_errors"]

ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "missed")
FP_TYPES = ERROR_TYPES[:5]
FOREGROUND_IOU, BACKGROUND_IOU = 0.5, 0.1
COCO_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
SIZES = ("small", "medium", "large")
_SIZE_EDGES = (32**2, 96**2)


def _size(boxes: Tensor) -> np.ndarray:
    """COCO's size bucket of each box: 0 small, 1 medium, 2 large."""
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).numpy()
    return np.digitize(area, _SIZE_EDGES)


@dataclass
class _Run:
    """The outcome at one foreground threshold. Per scored detection (those not ignored): image, index in its
    image's detections, class, score, true positive, size, error type ("tp" or one of FP_TYPES) and the box a loc or
    cls error points at (image, index) or None; per class the ground truth count by size; the missed boxes (class,
    size, image, index), and which detection fixes each pointed-at box (the highest-scoring one)."""

    image: list[int] = field(default_factory=list)
    det: list[int] = field(default_factory=list)
    cls: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    target: list[tuple[int, int] | None] = field(default_factory=list)
    target_cls: list[int] = field(default_factory=list)
    gt_count: dict[int, np.ndarray] = field(default_factory=dict)
    missed: list[tuple[int, int, int, int]] = field(default_factory=list)
    best_fix: dict[tuple[int, int], int] = field(default_factory=dict)  # box -> position of its fixing detection
    arrays: tuple[np.ndarray, ...] | None = None  # cls, score, kind, size as arrays, once the run is complete

    def add(
        self,
        image: int,
        det: int,
        cls: int,
        score: float,
        size: int,
        kind: str,
        target: tuple[int, int] | None = None,
        target_cls: int = -1,
    ) -> None:
        self.image.append(image)
        self.det.append(det)
        self.cls.append(cls)
        self.score.append(score)
        self.size.append(size)
        self.kind.append(kind)
        self.target.append(target)
        self.target_cls.append(target_cls)
        if target is not None:
            best = self.best_fix.get(target)
            if best is None or score > self.score[best]:
                self.best_fix[target] = len(self.score) - 1


def _image(
    run: _Run, index: int, gt: dict[str, Any], det: dict[str, Any], t_f: float, t_b: float, max_dets: int
) -> tuple[list[str], list[str], list[int | None]]:
    """Match one image at threshold t_f and add its outcome to `run`; (per detection its type or "ignored", per gt
    box "matched", "missed", "crowd" or "fixable", per gt box the detection that matched it or None). IoUs come from
    torchvision in float64; the matching runs on numpy arrays (per-element work on small tensors is slow)."""
    gt_labels = gt["labels"].long()
    crowd = gt["iscrowd"].bool() if gt.get("iscrowd") is not None else torch.zeros(len(gt_labels), dtype=torch.bool)
    gt_boxes = gt["boxes"].double()
    boxes, crowd_boxes = gt_boxes[~crowd], gt_boxes[crowd]
    labels = gt_labels[~crowd].numpy()
    gt_index = torch.nonzero(~crowd).flatten().tolist()
    sizes = _size(boxes)
    for c, s in zip(labels.tolist(), sizes.tolist()):
        run.gt_count.setdefault(c, np.zeros(3, dtype=np.int64))[s] += 1
    order_t = torch.argsort(det["scores"], descending=True, stable=True)[:max_dets]
    d_boxes = det["boxes"].double()[order_t]
    order, d_scores = order_t.tolist(), det["scores"][order_t].tolist()
    d_labels = det["labels"].long()[order_t].numpy()
    d_sizes = _size(d_boxes.float()).tolist()
    kinds = ["ignored"] * len(det["scores"])
    n_det, n_gt = len(order), len(labels)
    iou = box_iou(d_boxes, boxes).numpy() if n_gt and n_det else np.zeros((n_det, n_gt))
    same = d_labels[:, None] == labels[None, :]
    used = np.zeros(n_gt, dtype=bool)
    matched_with: dict[int, int] = {}
    for p in range(n_det if n_gt else 0):  # greedy, by score: each detection takes its best free box of its class
        candidates = np.where(same[p] & ~used, iou[p], 0.0)
        g = int(candidates.argmax())
        if candidates[g] >= t_f:
            used[g] = True
            matched_with[p] = g
    in_crowd = (box_ioa(d_boxes, crowd_boxes).amax(1) > t_f).tolist() if len(crowd_boxes) and n_det else None
    pointed: set[int] = set()
    for p in range(n_det):
        original, score, cls = order[p], d_scores[p], int(d_labels[p])
        if p in matched_with:
            kinds[original] = "tp"
            run.add(index, original, cls, score, int(sizes[matched_with[p]]), "tp")
            continue
        if in_crowd is not None and in_crowd[p]:
            continue  # ignored: neither a true nor a false positive
        kind, target = _false_positive(iou[p], same[p], used, t_f, t_b)
        if target is not None:
            pointed.add(target)
        fixable = target if target is not None and not used[target] else None
        run.add(
            index,
            original,
            cls,
            score,
            d_sizes[p],
            kind,
            None if fixable is None else (index, fixable),
            int(labels[fixable]) if fixable is not None else -1,
        )
        kinds[original] = kind
    gt_kinds = ["crowd"] * len(gt_labels)
    gt_match: list[int | None] = [None] * len(gt_labels)
    for p, g in matched_with.items():
        gt_match[gt_index[g]] = order[p]
    for g in range(n_gt):
        if used[g]:
            gt_kinds[gt_index[g]] = "matched"
        elif g in pointed:
            gt_kinds[gt_index[g]] = "fixable"
        else:
            gt_kinds[gt_index[g]] = "missed"
            run.missed.append((int(labels[g]), int(sizes[g]), index, gt_index[g]))
    return kinds, gt_kinds, gt_match


def _false_positive(
    iou: np.ndarray, same: np.ndarray, used: np.ndarray, t_f: float, t_b: float
) -> tuple[str, int | None]:
    """The type of a false positive from its IoUs with the image's boxes, and the box a loc or cls error points at."""
    if len(iou) == 0:
        return "bkg", None
    same_iou = np.where(same, iou, 0.0)
    g = int(same_iou.argmax())
    if t_b <= same_iou[g] <= t_f:
        return "loc", g
    other = np.where(same, 0.0, iou)
    g = int(other.argmax())
    if other[g] >= t_f:
        return "cls", g
    if np.where(used, same_iou, 0.0).max() >= t_f:
        return "dupe", None
    if iou.max() <= t_b:
        return "bkg", None
    return "both", None


def _ap(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> float:
    """TIDE's AP of one class: 101-point interpolated precision over recall, from scored detections."""
    if num_gt == 0 or len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    hits = tp[order].astype(np.float64)
    true = np.cumsum(hits)
    precision = true / np.arange(1, len(hits) + 1)
    recall = true / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0).mean())


def _map(run: _Run, fix: str | None, classes: Sequence[int] | None = None, size: int | None = None) -> dict[int, float]:
    """Per class AP with the errors of type `fix` fixed (None: as they are), over the classes with a detection or a
    box (or `classes`), restricted to objects of one size bucket when `size` is given."""
    if run.arrays is None or len(run.arrays[0]) != len(run.cls):  # made once per run, not per class and type
        run.arrays = (
            np.array(run.cls, dtype=np.int64),
            np.array(run.score),
            np.array(run.kind, dtype=object),
            np.array(run.size, dtype=np.int64),
        )
    cls, score, kinds, sizes = (a.copy() for a in run.arrays)
    tp = kinds == "tp"
    keep = np.ones(len(cls), dtype=bool)
    if fix in ("dupe", "bkg", "both"):
        keep &= kinds != fix
    elif fix in ("cls", "loc"):
        for i in np.nonzero(kinds == fix)[0]:
            if run.target[i] is not None and run.best_fix.get(run.target[i]) == i:
                tp[i] = True
                if fix == "cls":
                    cls[i] = run.target_cls[i]
            else:
                keep[i] = False
    if size is not None:
        keep &= sizes == size
    gt = {c: (n[size] if size is not None else int(n.sum())) for c, n in run.gt_count.items()}
    if fix == "missed":
        for c, s, _, _ in run.missed:
            if size is None or s == size:
                gt[c] -= 1
    present = set(cls[keep].tolist()) | {c for c, n in gt.items() if n > 0}
    wanted = sorted(present if classes is None else set(classes) & present)
    return {c: _ap(score[keep & (cls == c)], tp[keep & (cls == c)], gt.get(c, 0)) for c in wanted}


@dataclass
class ErrorAnalysis:
    """The decomposition (see the module docstring). counts: per error type at IoU 0.5; ap: the base AP at 0.5 and
    averaged over the COCO thresholds; dap: per error type the oracle dAP at 0.5 ("50") and averaged ("avg");
    per_class: {label: {"ap50", "dap": {type: dAP at 0.5}, "counts": {type: n}}}; per_size: {size: {"ap50", "dap"}};
    detections: per image per detection its type at IoU 0.5 ("tp", a false-positive type, or "ignored");
    ground_truth: per image per box "matched", "missed", "fixable" (a loc or cls error points at it) or "crowd";
    matches: per image per box the index of the detection that matched it at IoU 0.5, or None."""

    counts: dict[str, int]
    ap: dict[str, float]
    dap: dict[str, dict[str, float]]
    per_class: dict[int, dict[str, Any]]
    per_size: dict[str, dict[str, Any]]
    detections: list[list[str]]
    ground_truth: list[list[str]]
    matches: list[list[int | None]]

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready (errors.json): classes by name when `class_names` are given."""
        name = (lambda c: class_names[c]) if class_names else str  # noqa: E731
        return {
            "thresholds": {
                "foreground": FOREGROUND_IOU,
                "background": BACKGROUND_IOU,
                "averaged_over": list(COCO_THRESHOLDS),
            },
            "counts": self.counts,
            "ap": self.ap,
            "dap": self.dap,
            "per_class": {name(c): v for c, v in self.per_class.items()},
            "per_size": self.per_size,
        }


def analyze_errors(
    ground_truth: Sequence[dict[str, Any]],
    detections: Sequence[dict[str, Any]],
    max_dets: int = 100,
    background_iou: float = BACKGROUND_IOU,
) -> ErrorAnalysis:
    """TIDE's decomposition of `detections` against `ground_truth`, image by image (the same order and images in
    both): ground truth {"boxes": [G, 4] float XYXY, "labels": [G] int64, "iscrowd": [G] bool (optional)};
    detections {"boxes": [N, 4] float XYXY, "scores": [N] float, "labels": [N] int64}. AP values are in [0, 1]."""
    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} images of ground truth but {len(detections)} of detections")
    runs, det_kinds, gt_kinds, matches = {}, [], [], []
    for t_f in COCO_THRESHOLDS:
        run = _Run()
        for i, (gt, det) in enumerate(zip(ground_truth, detections)):
            kinds, gts, matched = _image(run, i, gt, det, t_f, background_iou, max_dets)
            if t_f == FOREGROUND_IOU:
                det_kinds.append(kinds)
                gt_kinds.append(gts)
                matches.append(matched)
        runs[t_f] = run
    base = {t: _mean(_map(run, None)) for t, run in runs.items()}
    dap: dict[str, dict[str, float]] = {}
    for kind in ERROR_TYPES:
        gained = {t: max(_mean(_map(run, kind)) - base[t], 0.0) for t, run in runs.items()}
        dap[kind] = {"50": gained[FOREGROUND_IOU], "avg": float(np.mean(list(gained.values())))}
    run = runs[FOREGROUND_IOU]
    counts = {k: run.kind.count(k) for k in FP_TYPES} | {"missed": len(run.missed)}
    per_class = {}
    kind_arr, cls_arr = np.array(run.kind, dtype=object), np.array(run.cls, dtype=np.int64)
    missed_cls = np.array([m[0] for m in run.missed], dtype=np.int64)
    for c, ap in _map(run, None).items():
        of_c = kind_arr[cls_arr == c]
        per_class[c] = {
            "ap50": ap,
            "dap": {k: max(_map(run, k, [c]).get(c, ap) - ap, 0.0) for k in ERROR_TYPES},
            "counts": {k: int((of_c == k).sum()) for k in FP_TYPES} | {"missed": int((missed_cls == c).sum())},
        }
    per_size = {}
    for s, name in enumerate(SIZES):
        ap = _mean(_map(run, None, size=s))
        per_size[name] = {"ap50": ap, "dap": {k: max(_mean(_map(run, k, size=s)) - ap, 0.0) for k in ERROR_TYPES}}
    return ErrorAnalysis(
        counts,
        {"50": base[FOREGROUND_IOU], "avg": float(np.mean(list(base.values())))},
        dap,
        per_class,
        per_size,
        det_kinds,
        gt_kinds,
        matches,
    )


def _mean(per_class: dict[int, float]) -> float:
    return float(np.mean(list(per_class.values()))) if per_class else float("nan")
