"""The commands' jobs, wired from configs: evaluation, detection on files, export, the anchor and inspection tools,
and the demo (training is retinanet.train.run_train).

file -> dataset -> transforms -> batch -> model -> (loss | detections) -> evaluation or drawing. The command line
(cli.py) is a thin layer over these functions. Image sizes come from the model config alone, so the training
run's own evaluation, `retinanet eval` of its checkpoint and `retinanet detect` all see the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from retinanet.config import DataConfig, RunConfig, model_config, parse_overrides, size_overrides, train_config
from retinanet.data import (
    DetectionDataset,
    build_dataset,
    categories_config,
    parse_coco,
    val_dataset,
    val_datasets,
    with_training_augmentation,
)
from retinanet.deploy import (
    ExportReport,
    OnnxPredictor,
    compare_engines,
    export_onnx,
    int8_path,
    quantize_int8,
    sample_images,
    verify_export,
)
from retinanet.evaluate import CocoMetrics, max_dets_for
from retinanet.inference import (
    Predictor,
    check_tta,
    categories_of,
    draw_mode,
    evaluate_model,
    evaluate_predictions,
    image_files,
    read_image,
    InferenceResult,
    run_inference,
)
from retinanet.model import RetinaNet, load_model
from retinanet.outputs import claim_detect_folder, remove_stale, writable_folder
from retinanet.tools import anchor_report
from retinanet.tools.errors import analyze_errors
from retinanet.tools.inspection import inspect_dataset
from retinanet.tools.report import ReportImage, write_report
from retinanet.tools.validation import validate
from retinanet.train import resolve_device, resolve_device_and_amp, run_train
from retinanet.visualize import save_detections_image
from retinanet.weights import load_torchvision_coco

__all__ = ["demo_config", "run_anchors", "run_config_of", "run_report", "run_demo", "run_detect", "run_eval", "run_export", "run_inspect",
           "run_train"]  # fmt: skip


def run_eval(
    checkpoint: str | Path, data: DataConfig, output: str | Path, device: str = "auto", amp: str = "none",
    report: bool = False, tta: str | None = None, **model_overrides: Any,
) -> dict[str, Any]:  # fmt: skip
    """Metrics of a checkpoint on every validation set of `data` (retinanet.tools.validation: COCO AP, AP50, AP75,
    AR100 and the AP50 each error type costs; data.extra_val's sets after their names), resized as the checkpoint's
    model config says (or with model_overrides such as min_size, max_size), in precision `amp` (the run's
    train.amp), with test-time augmentation `tta` (retinanet.inference.tta): the same numbers as the training run's
    own evaluation. Writes each set's files in output (the first) or output/<name>; with `report`, its report
    (retinanet.tools.report) in report/ there."""
    writable_folder(output, "evaluation")  # before the work, not after it
    check_tta(tta)
    resolved, amp = resolve_device_and_amp(train_config(device=device, amp=amp), flags=True)
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
        raise ValueError(f"{checkpoint}: the model was trained on category ids {list(model.config.category_ids)} "
                         f"but the evaluation data has {list(ids)}")  # fmt: skip
    names = tuple(dataset.category_names)
    if model.config.class_names and names != tuple(model.config.class_names):
        raise ValueError(f"{checkpoint}: the model was trained on categories {list(model.config.class_names)} "
                         f"but the evaluation data has {list(names)}")  # fmt: skip


def run_report(detections: str | Path, annotations: str | Path, output: str | Path,
               images: str | Path | None = None) -> Path:  # fmt: skip
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
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in found)],
                             dtype=torch.float32).reshape(-1, 4)  # fmt: skip
        dets.append({"image_id": record.image_id, "boxes": boxes, "scores": torch.tensor([float(r["score"]) for r in found]),
                     "labels": torch.tensor([label[int(r["category_id"])] for r in found], dtype=torch.int64)})  # fmt: skip
        gts.append({"image_id": record.image_id, "boxes": record.boxes, "labels": record.labels,
                    "iscrowd": record.iscrowd, "width": record.width, "height": record.height})  # fmt: skip
        readable = images is not None and record.path.is_file()
        shown.append(ReportImage(record.path.name, (record.height, record.width), record.path if readable else None,
                                 None if readable else np.full((record.height, record.width, 3), 235, np.uint8)))
    metrics = evaluate_predictions(gts, dets, categories, Path(output))
    errors = analyze_errors(gts, dets, max_dets=max_dets_for(gts))
    return write_report(output, shown, gts, dets, [c["name"] for c in categories], errors, metrics,
                        Path(output) / "pr_curves.png")  # fmt: skip


def _read_results(path: str | Path) -> list[dict[str, Any]]:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the detections ({exc})") from None
    if not isinstance(results, list) or any(not isinstance(r, dict) or not {"image_id", "category_id", "bbox",
                                                                              "score"} <= set(r) for r in results):
        raise ValueError(f"{path}: expected a COCO results list of {{image_id, category_id, bbox, score}}")
    return results


def run_config_of(checkpoint: str | Path) -> Path:
    """The config.yaml of the run that wrote `checkpoint` (in its folder): what `retinanet eval` evaluates on when
    no --config is given; a ValueError saying what to give when there is none."""
    found = Path(checkpoint).parent / "config.yaml"
    if not found.is_file():
        raise ValueError(f"eval: no --config given and no config.yaml beside {checkpoint}: give --config RUN.yaml, "
                         "the run config whose data section names the validation images")  # fmt: skip
    return found


# ----------------------------------------------------------------------------------------------------------------
def run_anchors(cfg: RunConfig, output: str | Path, fit: bool = False, max_anchors: int = 9) -> dict[str, Any]:
    """`retinanet anchors`: how the training boxes are covered by the model's anchors (retinanet.tools.anchor_report),
    with `fit` anchors fitted to them; writes anchors.json, anchors.png (and anchors_fit.yaml) in `output`."""
    writable_folder(output, "anchor report")
    train_set = build_dataset(cfg.data, cfg.model, "train", train_mode=True)
    model_cfg = categories_config(cfg.model, train_set)
    return anchor_report.write_report(train_set.records, model_cfg, output, fit=fit, max_anchors=max_anchors)


def run_inspect(cfg: RunConfig, output: str | Path, split: str = "train", augment: bool = False,
                show_anchors: bool = False, limit: int | None = 64, only_missed: bool = False,
                draw: str = "auto") -> dict[str, Any]:
    """`retinanet inspect`: the images of a split after the transforms (the training ones, random sizes and the
    DataConfig's augmentation, with `augment`; else the evaluation resize), boxes coloured by their anchors (draw:
    labelled, alone, or "auto"), and the data's statistics (retinanet.tools.inspection)."""
    if split not in ("train", "val"):
        raise ValueError(f"inspect: split must be 'train' or 'val', got {split!r}")
    torch.manual_seed(cfg.train.seed)  # the augmentations drawn are the same every time
    train_set = build_dataset(cfg.data, cfg.model, "train", train_mode=augment)
    model_cfg = categories_config(cfg.model, train_set)
    dataset = train_set if split == "train" else val_dataset(cfg.data, model_cfg, train_set.categories)
    if dataset is None:
        raise ValueError("data config: no validation set to inspect (set data.val_annotations, or data.root for VOC)")
    if augment:
        with_training_augmentation(dataset, cfg.data, model_cfg)
    return inspect_dataset(dataset, model_cfg, output, show_anchors=show_anchors, limit=limit, only_missed=only_missed,
                           draw=draw)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
def run_detect(
    inputs: Sequence[str | Path], output: str | Path, checkpoint: str | Path | None = None,
    torchvision_weights: str | None = None, score_thresh: float = 0.3, device: str = "auto",
    min_size: int | None = None, max_size: int | None = None, skip_bad: bool = False, onnx: str | Path | None = None,
    engine: str = "onnxruntime", tile: int | None = None, overlap: float = 0.2, batch_size: int = 4,
    workers: int = 0, csv_file: bool = False, draw: bool | str = True, overwrite: bool = False,
    tta: str | None = None, yolo_txt: bool = False, max_detections: int | None = None, allow_large: bool = False,
) -> InferenceResult:  # fmt: skip
    """Detect objects in image files, folders, globs and list files (retinanet.inference) with a checkpoint of ours
    (resized as it was evaluated, or by min_size / max_size), torchvision's COCO weights by name, or an exported
    ONNX file run by `engine`; in tiles of `tile` px when it is given. Writes an annotated PNG per image (draw:
    True or "auto", "labels", "boxes"; False or "none": none), detections.json (every image: box XYXY pixels,
    score, label, category_id, name), results.json (COCO results), with csv_file detections.csv, and with yolo_txt
    labels/NAME.txt (Ultralytics' layout). An unreadable file stops the run naming it, or with skip_bad is reported
    and skipped. An earlier detection's files in `output` are refused, or with `overwrite` replaced: kept until
    this detection has written its own (retinanet.outputs). tta: test-time augmentation's views
    (retinanet.inference.tta; PyTorch models only). max_detections: the model's cap of detections per image (per
    tile, in tiles), in place of its own. allow_large: decode whole an image past Pillow's limit that cannot be
    read by windows (retinanet.inference.rasters). Returns the InferenceResult (its counts; records read back)."""
    if sum(x is not None for x in (checkpoint, torchvision_weights, onnx)) != 1:
        raise ValueError("give one of: a checkpoint, torchvision weights by name, an ONNX file")
    if check_tta(tta) is not None and onnx is not None:
        raise ValueError("detect --tta runs the PyTorch model several times; it is not available with --onnx")
    draw_mode(draw)  # a wrong mode stops us first
    if max_detections is not None and onnx is not None:
        raise ValueError("--max-detections: an ONNX graph keeps the cap it was exported with; export the checkpoint "
                         "again with --max-detections")  # fmt: skip
    if max_detections is not None and max_detections < 1:
        raise ValueError(f"--max-detections {max_detections}: expected a positive number of detections per image")
    files = image_files(inputs)
    earlier = claim_detect_folder(output, overwrite)
    device = resolve_device(train_config(device=device), flags=True)
    sizes = size_overrides(min_size, max_size) | ({"detections_per_image": max_detections} if max_detections else {})
    options = {"score_thresh": score_thresh, "tile": tile, "overlap": overlap, "batch_size": batch_size}
    if onnx is not None:
        predictor: Predictor = OnnxPredictor(onnx, engine, **sizes, **options)
    elif checkpoint is not None:
        model = load_model(checkpoint, map_location=device, **sizes)
        predictor = Predictor(model, categories_of(model), device=device, tta=tta, **options)
    else:
        model, categories = load_torchvision_coco(torchvision_weights, **sizes)
        predictor = Predictor(model, categories, device=device, tta=tta, **options)
    result = run_inference(predictor, files, output, batch_size, workers, skip_bad, csv_file, draw,
                           yolo_txt=yolo_txt, allow_large=allow_large)  # fmt: skip
    remove_stale(earlier, result.written)  # the earlier detection's files that this one did not write again
    return result


def run_export(
    checkpoint: str | Path, output: str | Path, opset: int = 18, image_size: Sequence[int] | None = None,
    check_images: Sequence[str | Path] | None = None, int8: RunConfig | None = None, calibration_images: int = 200,
    **model_overrides: Any,
) -> ExportReport:  # fmt: skip
    """Export a checkpoint to ONNX (retinanet.deploy: dynamic size, or the fixed padded `image_size` (H, W)) and
    check the file: onnx.checker, and ONNX Runtime's detections against PyTorch's on `check_images` (default: two
    synthetic images of two sizes), each alone and both in one batch. With `int8` (a run config whose data
    calibrates it) also the INT8 model, output.int8.onnx (retinanet.deploy.quantize), its detections compared with
    the float32 export's. Returns the ExportReport."""
    writable_folder(Path(output).parent, "exported model")
    model = load_model(checkpoint, map_location="cpu", **model_overrides)
    images = [read_image(p) for p in check_images] if check_images else None  # bad files stop us before exporting
    calibration = _calibration_images(int8, model, calibration_images) if int8 is not None else None
    export_onnx(model, output, opset, tuple(image_size) if image_size else None)
    report = verify_export(model, output, images)
    if calibration is not None:
        quantized = quantize_int8(output, int8_path(output), model.config, calibration)
        report.int8 = (quantized, compare_engines(output, quantized, images or sample_images(model.config)))
    return report


def _calibration_images(cfg: RunConfig, model: RetinaNet, count: int) -> list:
    """Up to `count` images of the run's validation set (else its training set), spread over it, as uint8 [3, H, W]
    tensors: what INT8 quantization calibrates its activation ranges on."""
    known = categories_of(model) if model.config.class_names else None  # the images matter here, not the labels
    train_set = build_dataset(cfg.data, model.config, "train", train_mode=False, categories=known)
    dataset = val_dataset(cfg.data, model.config, train_set.categories) or train_set
    sample = dataset.subset(count)
    return [read_image(r.path) if r.path is not None else _pixels(sample.load_image(i))
            for i, r in enumerate(sample.records)]  # fmt: skip


def _pixels(image: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------------
def demo_config(output: str | Path = "runs/demo", **train_overrides: Any) -> RunConfig:
    """The demo: the small preset on the built-in synthetic shapes, sized to train in minutes on a 2-core CPU."""
    size = 128  # the synthetic images' own size: no resizing
    data = DataConfig(format="synthetic", synthetic_image_size=size, synthetic_train_images=3000,
                      synthetic_val_images=200, synthetic_cache=True)  # fmt: skip
    train_cfg = train_config(**{
        "optimizer": "adamw", "lr": 5e-3, "weight_decay": 1e-4, "warmup_iters": 50, "warmup_factor": 0.01,
        "max_iters": 1800, "lr_schedule": "cosine", "batch_size": 8, "grad_clip": 10.0, "amp": "none",
        "log_every": 20, "checkpoint_every": 600, "num_workers": 0, "device": "cpu", "output_dir": str(output),
        **train_overrides,
    })  # fmt: skip
    model = model_config("retinanet_tiny", min_size=size, max_size=size, backbone_width=32)
    return RunConfig(preset="retinanet_tiny", model=model, data=data, train=train_cfg)


def run_demo(output: str | Path = "runs/demo", overrides: Sequence[str] = (), **train_overrides: Any) -> dict[str, Any]:
    """Train, evaluate, draw: writes metrics.json (AP, AP50, AP75, APs, APm, APl, train_seconds),
    training_curves.png and annotated validation images under `output`, and returns the metrics. overrides:
    "train.KEY=VALUE" items from the command line (the demo's data and model are fixed)."""
    sections = parse_overrides(list(overrides))
    unknown = sorted(set(sections) - {"train"})
    if unknown:
        raise ValueError(f"demo overrides take train.KEY=VALUE only, got section(s) {unknown}")
    cfg = demo_config(output, **{**sections.get("train", {}), **train_overrides})
    out = Path(output)
    result = run_train(cfg, evaluate=False, overwrite=_holds_a_demo(out))  # a demo again replaces the last one
    model = result["model"].eval()
    val_set = build_dataset(cfg.data, cfg.model, "val", train_mode=False)
    metrics = evaluate_model(model, val_set, out / "eval", amp=cfg.train.amp)
    _draw_examples(model, val_set, out / "val_images", n=8)
    summary = {k: getattr(metrics, k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    summary["train_seconds"] = round(result["train_seconds"], 1)
    summary["iterations"] = result["iteration"]
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def _holds_a_demo(folder: Path) -> bool:
    """Whether `folder` holds an earlier demo (its metrics.json, and a run on the synthetic data), which a new demo
    replaces; any other run there is refused as `train` refuses it."""
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        return (folder / "metrics.json").is_file() and saved["data"]["format"] == "synthetic"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False


@torch.no_grad()
def _draw_examples(model: RetinaNet, dataset: DetectionDataset, folder: Path, n: int, score_thresh: float = 0.3):
    names = dataset.category_names
    for i in range(min(n, len(dataset))):
        image, _ = dataset[i]
        d = model.predict([image], resize=False)[0]
        keep = d.scores >= score_thresh
        save_detections_image(folder / f"val_{i:03d}.png", image, d.boxes[keep], d.scores[keep], d.labels[keep], names)
