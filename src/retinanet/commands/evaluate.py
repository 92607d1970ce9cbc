"""`retinanet eval` and `retinanet report`: a checkpoint's metrics on every validation set of a config, with
its report; the report of detections made anywhere against COCO annotations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinanet.config import DataConfig, load_run_config, parse_overrides, size_overrides
from retinanet.data import DetectionDataset, build_dataset, parse_coco, val_datasets
from retinanet.evaluation import evaluate_predictions, max_dets_for
from retinanet.evaluation.errors import analyze_errors
from retinanet.evaluation.report import ReportImage, write_report
from retinanet.evaluation.validation import validate
from retinanet.inference import categories_of, check_tta
from retinanet.model import RetinaNet, load_model
from retinanet.ops.boxes import xywh_to_xyxy
from retinanet.runtime.device import resolve_device, resolve_precision
from retinanet.runtime.outputs import strict_json, writable_folder

__all__ = ["main", "report_main", "run_config_of", "run_eval", "run_report"]


def run_eval(
    checkpoint: str | Path,
    data: DataConfig,
    output: str | Path,
    device: str = "auto",
    amp: str = "none",
    report: bool = False,
    tta: str | None = None,
    **model_overrides: Any,
) -> dict[str, Any]:
    """Metrics of a checkpoint on every validation set of `data` (retinanet.evaluation.validation: COCO AP, AP50, AP75,
    AR100 and the AP50 each error type costs; data.extra_val's sets after their names), resized as the checkpoint's
    model config says (or with model_overrides such as min_size, max_size), in precision `amp` (the run's
    train.amp), with test-time augmentation `tta` (retinanet.inference.tta): the same numbers as the training run's
    own evaluation. Writes each set's files in output (the first) or output/<name>; with `report`, its report
    (retinanet.evaluation.report) in report/ there."""
    writable_folder(output, "evaluation")  # before the work, not after it
    check_tta(tta)
    resolved = resolve_device(device)
    amp = resolve_precision(amp, resolved, "train.amp")  # the run config's precision: no command sets it
    model = load_model(checkpoint, map_location=resolved, **model_overrides).to(resolved)
    known = categories_of(model) if model.config.class_names else None
    sets = val_datasets(data, model.config, known)
    if not sets:
        build_dataset(data, model.config, "val", train_mode=False, categories=known)  # says which key is missing
    for dataset in sets.values():
        _check_categories(checkpoint, model, dataset)
    return validate(model, sets, Path(output), amp, report, tta)


def _check_categories(checkpoint: str | Path, model: RetinaNet, dataset: DetectionDataset) -> None:
    """A ValueError when the evaluation data's categories are not those the model learnt."""
    ids = tuple(c["id"] for c in dataset.categories)
    if model.config.category_ids and ids != tuple(model.config.category_ids):
        raise ValueError(
            f"{checkpoint}: the model was trained on category ids {list(model.config.category_ids)} "
            f"but the evaluation data has {list(ids)}"
        )
    names = tuple(dataset.category_names)
    if model.config.class_names and names != tuple(model.config.class_names):
        raise ValueError(
            f"{checkpoint}: the model was trained on categories {list(model.config.class_names)} "
            f"but the evaluation data has {list(names)}"
        )


def run_report(
    detections: str | Path, annotations: str | Path, output: str | Path, images: str | Path | None = None
) -> Path:
    """`retinanet report`: the report of detections made anywhere (a COCO results file: [{"image_id",
    "category_id", "bbox": [x, y, w, h], "score"}]) against COCO annotations, the images read from `images`
    (without them the gallery draws the boxes on blank images). Returns the page's path."""
    writable_folder(output, "report")
    categories, records, _ = parse_coco(annotations, images or ".")
    results = _read_results(detections)
    label = {c["id"]: k for k, c in enumerate(categories)}
    unknown = sorted({int(r["category_id"]) for r in results} - set(label))
    if unknown:
        raise ValueError(f"{detections}: category ids {unknown[:10]} are not in {annotations}")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    gts, dets, shown = [], [], []
    for record in records:
        found = by_image.get(record.image_id, [])
        # x + w in float64, rounded once to float32 (as the annotations are read: retinanet.data.coco)
        boxes = xywh_to_xyxy(torch.tensor([r["bbox"] for r in found], dtype=torch.float64).reshape(-1, 4)).float()
        dets.append(
            {
                "image_id": record.image_id,
                "boxes": boxes,
                "scores": torch.tensor([float(r["score"]) for r in found]),
                "labels": torch.tensor([label[int(r["category_id"])] for r in found], dtype=torch.int64),
            }
        )
        gts.append(
            {
                "image_id": record.image_id,
                "boxes": record.boxes,
                "labels": record.labels,
                "iscrowd": record.iscrowd,
                "width": record.width,
                "height": record.height,
            }
        )
        readable = images is not None and record.path.is_file()
        shown.append(
            ReportImage(
                record.path.name,
                (record.height, record.width),
                record.path if readable else None,
                None if readable else np.full((record.height, record.width, 3), 235, np.uint8),
            )
        )
    metrics = evaluate_predictions(gts, dets, categories, Path(output))
    errors = analyze_errors(gts, dets, max_dets=max_dets_for(gts))
    return write_report(
        output, shown, gts, dets, [c["name"] for c in categories], errors, metrics, Path(output) / "pr_curves.png"
    )


def _read_results(path: str | Path) -> list[dict[str, Any]]:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the detections ({exc})") from None
    if not isinstance(results, list) or any(
        not isinstance(r, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(r) for r in results
    ):
        raise ValueError(f"{path}: expected a COCO results list of {{image_id, category_id, bbox, score}}")
    for i, r in enumerate(results):
        box = r["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"{path}: entry {i}: bbox {box!r}; expected [x, y, w, h] numbers")
    return results


def run_config_of(checkpoint: str | Path) -> Path:
    """The config.yaml of the run that wrote `checkpoint` (in its folder): what `retinanet eval` evaluates on when
    no --config is given; a ValueError saying what to give when there is none."""
    found = Path(checkpoint).parent / "config.yaml"
    if not found.is_file():
        raise ValueError(
            f"eval: no --config given and no config.yaml beside {checkpoint}: give --config RUN.yaml, "
            "the run config whose data section names the validation images"
        )
    return found


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(
        args.config or run_config_of(args.checkpoint), args.set + (["data.skip_bad=true"] if args.skip_bad else [])
    )
    # the checkpoint's model with the model keys of the command line (--set model.min_size=96, as --min-size 96),
    # in the precision the run's config trained and evaluated in
    model_keys = {**parse_overrides(args.set).get("model", {}), **size_overrides(args.min_size, args.max_size)}
    metrics = run_eval(
        args.checkpoint, cfg.data, args.output, args.device, cfg.train.amp, args.report, args.tta, **model_keys
    )
    print(strict_json(metrics, indent=2))
    if args.report:
        print(
            f"report: {Path(args.output) / 'report' / 'index.html'} (errors.json beside it; data.extra_val's sets "
            "in their own folders)"
        )
    return 0


def report_main(args: argparse.Namespace) -> int:
    page = run_report(args.detections, args.annotations, args.output, args.images)
    print(f"report: {page} (errors.json beside it)")
    return 0
