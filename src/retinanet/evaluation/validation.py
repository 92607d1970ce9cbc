"""A model judged on one or several validation sets at once: per set its COCO AP, AP50, AP75, AR100 and the AP50
each error type costs (TIDE's dAP, retinanet.evaluation.errors), and one selection score that weighs the sets.

A detector that scores well on a held-out strip of its own training image may fall short on another site: the
sets are reported side by side (`data.extra_val`), and best.pt is chosen on their weighted mean, not on the first
set alone. Metric names: the first set's plain ("AP", "dAP50_loc"), every other set's after its name
("other_site/AP").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from retinanet.data import FIRST_VAL as FIRST
from retinanet.data import DetectionDataset
from retinanet.evaluation.coco import max_dets_for
from retinanet.evaluation.dataset import evaluate_model
from retinanet.evaluation.errors import ERROR_TYPES, analyze_errors
from retinanet.evaluation.report import report_dataset
from retinanet.model import RetinaNet

__all__ = ["FIRST", "metric_name", "selection_score", "validate", "validation_lines"]


def metric_name(set_name: str, metric: str) -> str:
    """The key of `metric` of validation set `set_name`: the first set's plain, another's after its name."""
    return metric if set_name == FIRST else f"{set_name}/{metric}"


def validate(
    model: RetinaNet,
    sets: Mapping[str, DetectionDataset],
    output: Path | None = None,
    amp: str = "none",
    report: bool = False,
    tta: str | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on every set (the first named FIRST): the COCO numbers (AP, AP50, AP75, ..., AR100 and
    per_class_ap) and per error type its dAP50 ("dAP50_loc", ...), under `metric_name`. With `output`: each set's
    evaluation files (detections, metrics.json, PR curves) in output (the first) or output/<name>, and with `report`
    its report in report/ there. tta: test-time augmentation's views (retinanet.inference.tta)."""
    metrics: dict[str, Any] = {}
    for name, dataset in sets.items():
        folder = None if output is None else (output if name == FIRST else output / name)
        kept: dict[str, Any] = {}
        coco = evaluate_model(model, dataset, folder, amp=amp, keep=kept, tta=tta)
        gts = kept["ground_truth"]
        errors = analyze_errors(gts, kept["detections"], max_dets=max_dets_for(gts))
        values = coco.to_dict() | {f"dAP50_{k}": errors.dap[k]["50"] for k in ERROR_TYPES}  # the 12 COCO numbers too
        metrics |= {metric_name(name, k): v for k, v in values.items()}
        if report and folder is not None:
            report_dataset(
                folder / "report",
                dataset,
                kept["ground_truth"],
                kept["detections"],
                coco,
                folder / "pr_curves.png",
                errors=errors,
            )
    return metrics


def selection_score(
    metrics: Mapping[str, Any], names: list[str], metric: str, weights: Mapping[str, float] | None = None
) -> float:
    """The weighted mean of `metric` over the validation sets `names` (weights: set name -> weight, missing ones 0;
    None: equal). NaN (a set without the metric) counts as 0."""
    weights = dict(weights) if weights is not None else {n: 1.0 for n in names}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"train config: best_weights names {unknown}, which are not validation sets ({names})")
    total = sum(weights.get(n, 0.0) for n in names)
    values = [(weights.get(n, 0.0), metrics.get(metric_name(n, metric), float("nan"))) for n in names]
    return sum(w * (v if v == v else 0.0) for w, v in values) / total


def validation_lines(metrics: Mapping[str, Any], names: list[str], iteration: int) -> list[str]:
    """One line per validation set: its AP, AP50, AP75 and the AP50 its costliest errors cost."""
    lines = []
    for name in names:
        get = lambda k: metrics.get(metric_name(name, k), float("nan"))  # noqa: E731
        costs = sorted(((v, k) for k in ERROR_TYPES if (v := get(f"dAP50_{k}")) == v), reverse=True)[:3]
        lines.append(
            f"eval at iteration {iteration}, {name}: AP {get('AP'):.3f}, AP50 {get('AP50'):.3f}, AP75 "
            f"{get('AP75'):.3f}; AP50 lost to " + ", ".join(f"{k} {v:.3f}" for v, k in costs)
        )
    return lines
