"""A model's detections on a whole dataset, and their COCO evaluation: the one path of a training run's own
evaluation, `retinanet eval`, the ablations and the loss analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from retinanet.data import DetectionDataset, make_loader
from retinanet.data.coco_format import save_coco_results
from retinanet.evaluation.coco import CocoMetrics, evaluate_coco, max_dets_for, plot_pr_curves
from retinanet.evaluation.voc import evaluate_voc
from retinanet.inference.predictor import detect_resized
from retinanet.model import RetinaNet
from retinanet.runtime import fastpath
from retinanet.runtime.outputs import write_json

__all__ = ["evaluate_model", "evaluate_predictions", "predict_dataset"]


@torch.no_grad()
def predict_dataset(
    model: RetinaNet,
    dataset: DetectionDataset,
    batch_size: int = 8,
    num_workers: int = 0,
    amp: str = "none",
    tta: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """Ground truth and detections of every image of `dataset` (evaluation transforms; tta: the test-time
    augmentation's views, retinanet.inference.tta), both in the original image's pixels, as the dicts
    `retinanet.evaluation` takes (retinanet.data.coco_format)."""
    was_training, layout = model.training, model.memory_format
    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    records = {r.image_id: r for r in dataset.records}
    gts, dets = [], []
    device = next(model.parameters()).device
    for i, (images, targets) in enumerate(loader):
        if i == 0:  # the layout faster for inference here: the same choice in a training run and in `retinanet eval`
            fastpath.tune(model, [im.to(device) for im in images])
        found = detect_resized(model, images, [t["scale"] for t in targets], amp, tta=tta)
        for d, t in zip(found, targets):
            rec = records[int(t["image_id"])]
            h0, w0 = t["orig_size"]
            dets.append({"image_id": rec.image_id, "boxes": d.boxes, "scores": d.scores, "labels": d.labels})
            gts.append(
                {
                    "image_id": rec.image_id,
                    "boxes": rec.boxes,
                    "labels": rec.labels,
                    "iscrowd": rec.iscrowd,
                    "width": int(w0),
                    "height": int(h0),
                }
            )
    model.train(was_training)
    model.use_memory_format(layout)
    return gts, dets


def evaluate_model(
    model: RetinaNet, dataset: DetectionDataset, output: Path | None = None, keep: dict[str, Any] | None = None, **kw
) -> CocoMetrics:
    """COCO metrics of `model` on `dataset`; with `output`, also detections.json (COCO results format),
    metrics.json (the COCO numbers, per-class AP and Pascal VOC mAP@0.5) and pr_curves.png there. keep: a dict
    that receives the "ground_truth" and "detections" evaluated (for a report of them)."""
    gts, dets = predict_dataset(model, dataset, **kw)
    if keep is not None:
        keep.update(ground_truth=gts, detections=dets)
    return evaluate_predictions(gts, dets, dataset.categories, output)


def evaluate_predictions(
    gts: list[dict], dets: list[dict], categories: list[dict[str, Any]], output: Path | None = None
) -> CocoMetrics:
    """COCO metrics of detections against their ground truth (as predict_dataset gives them), and with `output` the
    files of `evaluate_model`."""
    metrics = evaluate_coco(gts, dets, categories, max_dets=max_dets_for(gts))
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        save_coco_results(dets, categories, output / "detections.json")
        voc = evaluate_voc(gts, dets, len(categories))
        report = {**metrics.to_dict(), "VOC_mAP50": voc["mAP"]}
        write_json(output / "metrics.json", report, indent=2)
        plot_pr_curves(metrics, output / "pr_curves.png")
    return metrics
