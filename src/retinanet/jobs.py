"""The main job, end to end: datasets from a DataConfig, training, evaluation, detection on files, the demo.

file -> dataset -> transforms -> batch -> model -> (loss | detections) -> evaluation or drawing. The command line
(cli.py) is a thin layer over these functions. Image sizes come from the model config alone, so the training
run's own evaluation, `retinanet eval` of its checkpoint and `retinanet detect` all see the same pixels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from retinanet import anchor_tools, fastpath
from retinanet.config import ModelConfig, apply_overrides
from retinanet.data import (
    CocoDetection,
    CsvDetection,
    DetectionDataset,
    SyntheticShapes,
    VocDetection,
    eval_transforms,
    make_loader,
    train_transforms,
)
from retinanet.detector import RetinaNet, build_from_config
from retinanet.engine import (
    init_distributed,
    load_checkpoint,
    load_model,
    resolve_device,
    resolve_device_and_amp,
    train,
    write_note,
)
from retinanet.evaluate import CocoMetrics, evaluate_coco, evaluate_voc, plot_pr_curves, save_coco_results
from retinanet.inference import image_files, run_inference
from retinanet.inspection import inspect_dataset
from retinanet.predictor import Predictor, categories_of, detect_resized
from retinanet.pretrained import init_from
from retinanet.runconfig import DataConfig, RunConfig, save_run_config
from retinanet.train_config import train_config
from retinanet.visualize import plot_training_curves, save_detections_image

if TYPE_CHECKING:  # export needs onnx at run time, only when exporting
    from retinanet.export import ExportReport

__all__ = ["build_dataset", "run_train", "evaluate_model", "run_eval", "run_detect", "run_export", "demo_config",
           "run_demo", "run_anchors", "run_inspect", "categories_of"]  # fmt: skip


def build_dataset(
    data: DataConfig, model: ModelConfig, split: str, train_mode: bool, categories: list[dict[str, Any]] | None = None
) -> DetectionDataset:
    """The train or val dataset of `data`, resized as `model` says: training transforms (a shorter side drawn from
    model.training_sizes, flips) or evaluation transforms (model.min_size). Every image file is checked to exist.

    categories: the label map to use where the data does not fix one (CSV without a classes file): the training
    set's for the validation set, the model's for evaluation, so that a name gets the label the model learnt."""
    if train_mode:
        tf = train_transforms(model.training_sizes, model.max_size, data.flip_prob)
    else:
        tf = eval_transforms(model.min_size, model.max_size)
    fmt, is_train = data.format, split == "train"
    if fmt == "synthetic":
        n = data.synthetic_train_images if is_train else data.synthetic_val_images
        size = (data.synthetic_image_size, data.synthetic_image_size)
        return SyntheticShapes(split, num_images=n, image_size=size, seed=data.synthetic_seed, transforms=tf,
                               cache=data.synthetic_cache and is_train, max_objects=data.synthetic_max_objects,
                               min_size=data.synthetic_min_object_size,
                               max_size_frac=data.synthetic_max_object_frac)  # fmt: skip
    images = data.train_images if is_train else data.val_images
    annotations = data.train_annotations if is_train else data.val_annotations
    if fmt == "coco":
        _require(data, images=images, annotations=annotations, split=split)
        dataset = CocoDetection(images, annotations, transforms=tf, skip_bad=data.skip_bad)
    elif fmt == "csv":
        _require(data, annotations=annotations, split=split)
        dataset = CsvDetection(annotations, data.classes, root=images, transforms=tf, skip_bad=data.skip_bad,
                               categories=None if data.classes else categories)  # fmt: skip
    else:
        _require(data, root=data.root, split=split)
        voc_split = data.train_split if is_train else data.val_split
        dataset = VocDetection(data.root, voc_split, transforms=tf, skip_bad=data.skip_bad)
    return dataset.check_files()


def _require(data: DataConfig, split: str, **paths: str | None) -> None:
    missing = [k for k, v in paths.items() if v is None]
    if missing:
        raise ValueError(f"data config: format {data.format!r} needs {split} {', '.join(missing)} (set data.* keys)")


def _categories_config(model_cfg: ModelConfig, dataset: DetectionDataset) -> ModelConfig:
    """The model config with num_classes and category names/ids taken from the training dataset."""
    return apply_overrides(model_cfg, {
        "num_classes": dataset.num_classes,
        "class_names": tuple(dataset.category_names),
        "category_ids": tuple(c["id"] for c in dataset.categories),
    })  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_dataset(
    model: RetinaNet, dataset: DetectionDataset, batch_size: int = 8, num_workers: int = 0, amp: str = "none"
) -> tuple[list[dict], list[dict]]:
    """Ground truth and detections of every image of `dataset` (evaluation transforms), both in the original
    image's pixels, as the dicts `retinanet.evaluate` takes."""
    was_training, layout = model.training, model.memory_format
    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    records = {r.image_id: r for r in dataset.records}
    gts, dets = [], []
    device = next(model.parameters()).device
    for i, (images, targets) in enumerate(loader):
        if i == 0:  # the layout faster for inference here: the same choice in a training run and in `retinanet eval`
            fastpath.tune(model, [im.to(device) for im in images])
        found = detect_resized(model, images, [t["scale"] for t in targets], amp)
        for d, t in zip(found, targets):
            rec = records[int(t["image_id"])]
            h0, w0 = t["orig_size"]
            dets.append({"image_id": rec.image_id, "boxes": d.boxes, "scores": d.scores, "labels": d.labels})
            gts.append({"image_id": rec.image_id, "boxes": rec.boxes, "labels": rec.labels, "iscrowd": rec.iscrowd,
                        "width": int(w0), "height": int(h0)})  # fmt: skip
    model.train(was_training)
    model.use_memory_format(layout)
    return gts, dets


def evaluate_model(model: RetinaNet, dataset: DetectionDataset, output: Path | None = None, **kw) -> CocoMetrics:
    """COCO metrics of `model` on `dataset`; with `output`, also detections.json (COCO results format),
    metrics.json (the COCO numbers, per-class AP and Pascal VOC mAP@0.5) and pr_curves.png there."""
    gts, dets = predict_dataset(model, dataset, **kw)
    categories = dataset.categories
    metrics = evaluate_coco(gts, dets, categories)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        save_coco_results(dets, categories, output / "detections.json")
        voc = evaluate_voc(gts, dets, len(categories))
        report = {**metrics.to_dict(), "VOC_mAP50": voc["mAP"]}
        (output / "metrics.json").write_text(json.dumps(report, indent=2))
        plot_pr_curves(metrics, output / "pr_curves.png")
    return metrics


# ----------------------------------------------------------------------------------------------------------------
def run_train(cfg: RunConfig, resume: str | Path | None = None, evaluate: bool = True) -> dict[str, Any]:
    """Train as `cfg` says: saves config.yaml, train.log, log.jsonl, tb/, last.pt, training_curves.png (and
    evaluation results, when there is a validation set) in cfg.train.output_dir.

    Everything that can be checked is checked before anything is written: the config, every image file, the
    checkpoint to resume from, the device and precision. The model is built after seeding, so that a run is a
    function of its config and seed."""
    init_distributed()  # joins the process group when launched by torchrun; a no-op otherwise
    out = Path(cfg.train.output_dir)
    device = resolve_device(cfg.train)  # a device or precision this machine lacks stops us first
    train_set = build_dataset(cfg.data, cfg.model, "train", train_mode=True)
    cfg.model = _categories_config(cfg.model, train_set)
    val_set = _val_dataset(cfg.data, cfg.model, train_set.categories) if evaluate else None
    if resume is not None:
        load_checkpoint(resume)  # a missing or unreadable checkpoint stops the run here, not after setup
    workers, workers_warning = cfg.train.workers()
    torch.manual_seed(cfg.train.seed)  # the model's initial weights are part of the run
    model = build_from_config(cfg.model)
    init_lines = _init_weights(model, resume)
    per_process = cfg.train.batch_size // max(_world(), 1)
    loader = make_loader(train_set, per_process, shuffle=True, num_workers=workers,
                         seed=cfg.train.seed, distributed=_world() > 1, drop_last=True)  # fmt: skip
    if _rank() == 0:  # the run will start: now its folder is written
        save_run_config(cfg, out / "config.yaml")
        boxes = anchor_tools.training_boxes(train_set.records, model.config, one_size_each=True)  # seconds
        coverage = anchor_tools.coverage(boxes, model.config)
        for line in [_summary(cfg, train_set, val_set, device, workers), workers_warning, *init_lines,
                     *anchor_tools.coverage_lines(coverage)]:  # fmt: skip
            if line:
                print(line, flush=True)
                write_note(out, line)

    def evaluate(m, iteration):  # on the main process only
        if _rank() != 0:
            return {}
        base = m.module if hasattr(m, "module") else m
        return evaluate_model(base, val_set, out / "eval", amp=fastpath.current_run().amp).to_dict()

    t0 = time.perf_counter()
    result = train(model, loader, cfg.train, out, eval_fn=evaluate if val_set is not None else None, resume=resume)
    result["train_seconds"] = time.perf_counter() - t0
    if _rank() == 0 and (out / "log.jsonl").exists():
        plot_training_curves(out / "log.jsonl", out / "training_curves.png")
    result["model"] = model
    return result


def _init_weights(model: RetinaNet, resume: str | Path | None) -> list[str]:
    """model.init_from applied to `model` (retinanet.pretrained), as log lines; not when resuming, whose
    checkpoint holds the weights."""
    if model.config.init_from is None:
        return []
    if resume is not None:
        return [f"init_from {model.config.init_from}: not applied, the weights come from {resume}"]
    return init_from(model).lines()


def _summary(cfg: RunConfig, train_set: DetectionDataset, val_set: DetectionDataset | None, device: torch.device,
             workers: int) -> str:  # fmt: skip
    """One line saying what the run will do."""
    t, m = cfg.train, cfg.model
    epochs = t.max_iters * t.batch_size / max(len(train_set), 1)
    val = f", {len(val_set)} validation images" if val_set is not None else ", no validation set"
    sizes = "" if m.training_sizes == (m.min_size,) else f" (training: drawn from {list(m.training_sizes)})"
    return (f"run: {len(train_set)} training images ({cfg.data.format}, {m.num_classes} classes){val}; "
            f"{t.max_iters} iterations of {t.batch_size} images = {epochs:.1f} epochs; images resized to shorter "
            f"side {m.min_size}, longer at most {m.max_size}{sizes}; {cfg.preset} {m.backbone}; lr {t.lr:g} "
            f"({t.optimizer}), {t.schedule().describe()}; device {device}, amp {t.amp}, {workers} data workers; "
            f"output {t.output_dir}")  # fmt: skip


def _val_dataset(data: DataConfig, model: ModelConfig, categories: list[dict[str, Any]]) -> DetectionDataset | None:
    if data.format == "synthetic" or (data.format == "voc" and data.root) or data.val_annotations:
        return build_dataset(data, model, "val", train_mode=False, categories=categories)
    return None


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def run_eval(
    checkpoint: str | Path, data: DataConfig, output: str | Path, device: str = "cpu", amp: str = "none",
    **model_overrides: Any,
) -> CocoMetrics:  # fmt: skip
    """COCO metrics of a checkpoint on the validation data of `data`, resized as the checkpoint's model config says
    (or with model_overrides such as min_size, max_size), in precision `amp` (the run's train.amp): the same numbers
    as the training run's own evaluation."""
    resolved, amp = resolve_device_and_amp(train_config(device=device, amp=amp))
    model = load_model(checkpoint, map_location=resolved, **model_overrides).to(resolved)
    known = categories_of(model) if model.config.class_names else None
    dataset = build_dataset(data, model.config, "val", train_mode=False, categories=known)
    ids = tuple(c["id"] for c in dataset.categories)
    if model.config.category_ids and ids != tuple(model.config.category_ids):
        raise ValueError(f"{checkpoint}: the model was trained on category ids {list(model.config.category_ids)} "
                         f"but the evaluation data has {list(ids)}")  # fmt: skip
    names = tuple(dataset.category_names)
    if model.config.class_names and names != tuple(model.config.class_names):
        raise ValueError(f"{checkpoint}: the model was trained on categories {list(model.config.class_names)} "
                         f"but the evaluation data has {list(names)}")  # fmt: skip
    return evaluate_model(model, dataset, Path(output), amp=amp)


# ----------------------------------------------------------------------------------------------------------------
def run_anchors(cfg: RunConfig, output: str | Path, fit: bool = False, max_anchors: int = 9) -> dict[str, Any]:
    """`retinanet anchors`: how the training boxes are covered by the model's anchors (retinanet.anchor_tools),
    with `fit` anchors fitted to them; writes anchors.json, anchors.png (and anchors_fit.yaml) in `output`."""
    train_set = build_dataset(cfg.data, cfg.model, "train", train_mode=True)
    model_cfg = _categories_config(cfg.model, train_set)
    return anchor_tools.write_report(train_set.records, model_cfg, output, fit=fit, max_anchors=max_anchors)


def run_inspect(cfg: RunConfig, output: str | Path, split: str = "train", augment: bool = False,
                show_anchors: bool = False, limit: int | None = 64, only_missed: bool = False) -> dict[str, Any]:
    """`retinanet inspect`: the images of a split after the transforms (the training ones, random sizes and flips,
    with `augment`; else the evaluation resize), boxes coloured by their anchors, and the data's statistics
    (retinanet.inspection)."""
    if split not in ("train", "val"):
        raise ValueError(f"inspect: split must be 'train' or 'val', got {split!r}")
    torch.manual_seed(cfg.train.seed)  # the augmentations drawn are the same every time
    train_set = build_dataset(cfg.data, cfg.model, "train", train_mode=augment)
    model_cfg = _categories_config(cfg.model, train_set)
    dataset = train_set if split == "train" else _val_dataset(cfg.data, model_cfg, train_set.categories)
    if dataset is None:
        raise ValueError("data config: no validation set to inspect (set data.val_annotations, or data.root for VOC)")
    if augment:
        dataset.transforms = train_transforms(model_cfg.training_sizes, model_cfg.max_size, cfg.data.flip_prob)
    return inspect_dataset(dataset, model_cfg, output, show_anchors=show_anchors, limit=limit, only_missed=only_missed)


# ----------------------------------------------------------------------------------------------------------------
def run_detect(
    inputs: Sequence[str | Path], output: str | Path, checkpoint: str | Path | None = None,
    torchvision_weights: str | None = None, score_thresh: float = 0.3, device: str = "cpu",
    min_size: int | None = None, max_size: int | None = None, skip_bad: bool = False, onnx: str | Path | None = None,
    engine: str = "onnxruntime", tile: int | None = None, overlap: float = 0.2, batch_size: int = 4,
    workers: int = 0, csv_file: bool = False, draw: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """Detect objects in image files, folders, globs and list files (retinanet.inference) with a checkpoint of ours
    (resized as it was evaluated, or by min_size / max_size), torchvision's COCO weights by name, or an exported
    ONNX file run by `engine`; in tiles of `tile` px when it is given. Writes an annotated PNG per image,
    detections.json (every image: box XYXY pixels, score, label, category_id, name), results.json (COCO results)
    and with csv_file detections.csv. An unreadable file stops the run naming it, or with skip_bad is reported and
    skipped. Returns the records of detections.json."""
    if sum(x is not None for x in (checkpoint, torchvision_weights, onnx)) != 1:
        raise ValueError("give one of: a checkpoint, torchvision weights by name, an ONNX file")
    files = image_files(inputs)
    sizes = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
    options = {"score_thresh": score_thresh, "tile": tile, "overlap": overlap, "batch_size": batch_size}
    if onnx is not None:
        from retinanet.export import OnnxPredictor

        predictor: Predictor = OnnxPredictor(onnx, engine, **sizes, **options)
    elif checkpoint is not None:
        model = load_model(checkpoint, map_location=device, **sizes)
        predictor = Predictor(model, categories_of(model), device=device, **options)
    else:
        from retinanet.interop import load_torchvision_coco

        model, categories = load_torchvision_coco(torchvision_weights, **sizes)
        predictor = Predictor(model, categories, device=device, **options)
    result = run_inference(predictor, files, output, batch_size, workers, skip_bad, csv_file, draw)
    return result.records


def run_export(
    checkpoint: str | Path, output: str | Path, opset: int = 18, image_size: Sequence[int] | None = None,
    check_images: Sequence[str | Path] | None = None, **model_overrides: Any,
) -> ExportReport:  # fmt: skip
    """Export a checkpoint to ONNX (retinanet.export: dynamic size, or the fixed padded `image_size` (H, W)) and
    check the file: onnx.checker, and ONNX Runtime's detections against PyTorch's on `check_images` (default: two
    synthetic images of two sizes), each alone and both in one batch. Returns the export.ExportReport."""
    from retinanet.export import export_onnx, verify_export
    from retinanet.predictor import read_image

    model = load_model(checkpoint, map_location="cpu", **model_overrides)
    images = [read_image(p) for p in check_images] if check_images else None  # bad files stop us before exporting
    export_onnx(model, output, opset, tuple(image_size) if image_size else None)
    return verify_export(model, output, images)


# ----------------------------------------------------------------------------------------------------------------
def demo_config(output: str | Path = "runs/demo", **train_overrides: Any) -> RunConfig:
    """The demo: the small preset on the built-in synthetic shapes, sized to train in minutes on a 2-core CPU."""
    from retinanet.config import model_config

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


def run_demo(output: str | Path = "runs/demo", **train_overrides: Any) -> dict[str, Any]:
    """Train, evaluate, draw: prints the COCO metrics and writes metrics.json (AP, AP50, AP75, APs, APm, APl,
    train_seconds), training_curves.png and annotated validation images under `output`."""
    cfg = demo_config(output, **train_overrides)
    out = Path(output)
    result = run_train(cfg, evaluate=False)
    model = result["model"].eval()
    val_set = build_dataset(cfg.data, cfg.model, "val", train_mode=False)
    metrics = evaluate_model(model, val_set, out / "eval", amp=cfg.train.amp)
    _draw_examples(model, val_set, out / "val_images", n=8)
    summary = {k: getattr(metrics, k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    summary["train_seconds"] = round(result["train_seconds"], 1)
    summary["iterations"] = result["iteration"]
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def _draw_examples(model: RetinaNet, dataset: DetectionDataset, folder: Path, n: int, score_thresh: float = 0.3):
    names = dataset.category_names
    for i in range(min(n, len(dataset))):
        image, _ = dataset[i]
        d = model.predict([image], resize=False)[0]
        keep = d.scores >= score_thresh
        save_detections_image(folder / f"val_{i:03d}.png", image, d.boxes[keep], d.scores[keep], d.labels[keep], names)
