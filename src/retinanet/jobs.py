"""The main job, end to end: datasets from a DataConfig, training, evaluation, detection on files, the demo.

file -> dataset -> transforms -> batch -> model -> (loss | detections) -> evaluation or drawing. The command line
(cli.py) is a thin layer over these functions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from retinanet.config import apply_overrides
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
from retinanet.engine import init_distributed, load_model, train
from retinanet.evaluate import CocoMetrics, evaluate_coco, evaluate_voc, plot_pr_curves, save_coco_results
from retinanet.runconfig import DataConfig, RunConfig, save_run_config
from retinanet.visualize import plot_training_curves, save_detections_image

__all__ = ["build_dataset", "run_train", "evaluate_model", "run_eval", "run_detect", "demo_config", "run_demo"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def build_dataset(
    data: DataConfig, split: str, train_mode: bool, categories: list[dict[str, Any]] | None = None
) -> DetectionDataset:
    """The train or val dataset of `data`, with training (multi-scale, flip) or evaluation transforms.

    categories: the label map to use where the data does not fix one (CSV without a classes file): the training
    set's for the validation set, the model's for evaluation, so that a name gets the label the model learnt."""
    if train_mode:
        tf = train_transforms(data.train_min_sizes, data.max_size, data.flip_prob)
    else:
        tf = eval_transforms(data.eval_min_size, data.max_size)
    fmt, is_train = data.format, split == "train"
    if fmt == "synthetic":
        n = data.synthetic_train_images if is_train else data.synthetic_val_images
        size = (data.synthetic_image_size, data.synthetic_image_size)
        return SyntheticShapes(split, num_images=n, image_size=size, seed=data.synthetic_seed, transforms=tf,
                               cache=data.synthetic_cache and is_train)
    images = data.train_images if is_train else data.val_images
    annotations = data.train_annotations if is_train else data.val_annotations
    if fmt == "coco":
        _require(data, images=images, annotations=annotations, split=split)
        return CocoDetection(images, annotations, transforms=tf, skip_bad=data.skip_bad)
    if fmt == "csv":
        _require(data, annotations=annotations, split=split)
        return CsvDetection(annotations, data.classes, root=images, transforms=tf, skip_bad=data.skip_bad,
                            categories=None if data.classes else categories)  # fmt: skip
    _require(data, root=data.root, split=split)
    voc_split = data.train_split if is_train else data.val_split
    return VocDetection(data.root, voc_split, transforms=tf, skip_bad=data.skip_bad)


def _require(data: DataConfig, split: str, **paths: str | None) -> None:
    missing = [k for k, v in paths.items() if v is None]
    if missing:
        raise ValueError(f"data config: format {data.format!r} needs {split} {', '.join(missing)} (set data.* keys)")


def _categories_config(model_cfg, dataset: DetectionDataset):
    """The model config with num_classes and category names/ids taken from the training dataset."""
    return apply_overrides(model_cfg, {
        "num_classes": dataset.num_classes,
        "class_names": tuple(dataset.category_names),
        "category_ids": tuple(c["id"] for c in dataset.categories),
    })  # fmt: skip


def categories_of(model: RetinaNet) -> list[dict[str, Any]]:
    cfg = model.config
    names = cfg.class_names or tuple(str(i) for i in range(cfg.num_classes))
    ids = cfg.category_ids or tuple(range(cfg.num_classes))
    return [{"id": int(i), "name": n} for i, n in zip(ids, names)]


# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_dataset(
    model: RetinaNet, dataset: DetectionDataset, batch_size: int = 8, num_workers: int = 0, amp: str = "none"
) -> tuple[list[dict], list[dict]]:
    """Ground truth and detections of every image of `dataset` (evaluation transforms), both in the original
    image's pixels, as the dicts `retinanet.evaluate` takes."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    records = {r.image_id: r for r in dataset.records}
    gts, dets = [], []
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    for images, targets in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=amp != "none"):
            out = model.predict([im.to(device) for im in images], resize=False)
        for d, t in zip(out, targets):
            sy, sx = t["scale"]
            scale = torch.tensor([sx, sy, sx, sy], device=d.boxes.device)
            rec = records[int(t["image_id"])]
            h0, w0 = t["orig_size"]
            dets.append({"image_id": rec.image_id, "boxes": (d.boxes.float() / scale).cpu(), "scores": d.scores.float().cpu(),
                         "labels": d.labels.cpu()})  # fmt: skip
            gts.append({"image_id": rec.image_id, "boxes": rec.boxes, "labels": rec.labels, "iscrowd": rec.iscrowd,
                        "width": int(w0), "height": int(h0)})  # fmt: skip
    model.train(was_training)
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
    """Train as `cfg` says: saves config.yaml, log.jsonl, tb/, last.pt, training_curves.png (and evaluation
    results, when there is a validation set) in cfg.train.output_dir."""
    init_distributed()  # joins the process group when launched by torchrun; a no-op otherwise
    out = Path(cfg.train.output_dir)
    train_set = build_dataset(cfg.data, "train", train_mode=True)
    cfg.model = _categories_config(cfg.model, train_set)
    val_set = _val_dataset(cfg.data, train_set.categories) if evaluate else None
    save_run_config(cfg, out / "config.yaml")
    model = build_from_config(cfg.model)
    per_process = cfg.train.batch_size // max(_world(), 1)
    loader = make_loader(train_set, per_process, shuffle=True, num_workers=cfg.train.num_workers,
                         seed=cfg.train.seed, distributed=_world() > 1, drop_last=True)  # fmt: skip
    def evaluate(m, iteration):  # on the main process only
        if _rank() != 0:
            return {}
        base = m.module if hasattr(m, "module") else m
        return evaluate_model(base, val_set, out / "eval", amp=cfg.train.amp).to_dict()

    t0 = time.perf_counter()
    result = train(model, loader, cfg.train, out, eval_fn=evaluate if val_set is not None else None, resume=resume)
    result["train_seconds"] = time.perf_counter() - t0
    if _rank() == 0 and (out / "log.jsonl").exists():
        plot_training_curves(out / "log.jsonl", out / "training_curves.png")
    result["model"] = model
    return result


def _val_dataset(data: DataConfig, categories: list[dict[str, Any]]) -> DetectionDataset | None:
    if data.format == "synthetic" or (data.format == "voc" and data.root) or data.val_annotations:
        return build_dataset(data, "val", train_mode=False, categories=categories)
    return None


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def run_eval(checkpoint: str | Path, data: DataConfig, output: str | Path, device: str = "cpu") -> CocoMetrics:
    model = load_model(checkpoint, map_location=device).to(device)
    data = apply_overrides(data, {"eval_min_size": model.config.min_size, "max_size": model.config.max_size})
    known = categories_of(model) if model.config.class_names else None
    dataset = build_dataset(data, "val", train_mode=False, categories=known)
    ids = tuple(c["id"] for c in dataset.categories)
    if model.config.category_ids and ids != tuple(model.config.category_ids):
        raise ValueError(f"{checkpoint}: the model was trained on category ids {list(model.config.category_ids)} "
                         f"but the evaluation data has {list(ids)}")  # fmt: skip
    names = tuple(dataset.category_names)
    if model.config.class_names and names != tuple(model.config.class_names):
        raise ValueError(f"{checkpoint}: the model was trained on categories {list(model.config.class_names)} "
                         f"but the evaluation data has {list(names)}")  # fmt: skip
    return evaluate_model(model, dataset, Path(output))


# ----------------------------------------------------------------------------------------------------------------
def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (non-recursively, sorted) in the folders given."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise ValueError(f"input not found: {item}")
    if not files:
        raise ValueError(f"no images found in {[str(i) for i in inputs]}")
    return files


def read_image(path: Path) -> torch.Tensor:
    """float [3, H, W] in [0, 1]; a ValueError naming the file for a missing, corrupt or truncated image."""
    try:
        with Image.open(path) as im:
            return pil_to_tensor(im.convert("RGB")).float() / 255
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{path}: cannot read the image ({exc})") from None


def run_detect(
    inputs: Sequence[str | Path], output: str | Path, checkpoint: str | Path | None = None,
    torchvision_weights: str | None = None, score_thresh: float = 0.3, device: str = "cpu",
) -> list[dict[str, Any]]:  # fmt: skip
    """Detect objects in image files with a checkpoint of ours or torchvision's COCO weights by name; writes an
    annotated PNG per image and detections.json (per file: box XYXY pixels, score, label, category_id, name)."""
    if (checkpoint is None) == (torchvision_weights is None):
        raise ValueError("give either a checkpoint or torchvision weights by name")
    if checkpoint is not None:
        model = load_model(checkpoint, map_location=device)
        categories = categories_of(model)
    else:
        from retinanet.interop import load_torchvision_coco

        model, categories = load_torchvision_coco(torchvision_weights)
    model.to(device).eval()
    names = [c["name"] for c in categories]
    out = Path(output)
    results = []
    # our checkpoints see the resize they were trained and evaluated with (the data transforms); torchvision's
    # models keep their own internal resize, so that their detections stay torchvision's
    resize = eval_transforms(model.config.min_size, model.config.max_size) if checkpoint is not None else None
    for path in image_files(inputs):
        image = read_image(path)
        d = _predict_file(model, image, resize, device)
        keep = d.scores >= score_thresh
        boxes, scores, labels = d.boxes[keep].cpu(), d.scores[keep].cpu(), d.labels[keep].cpu()
        save_detections_image(out / f"{path.stem}.png", image, boxes, scores, labels, names)
        results.append({"file": str(path), "detections": [
            {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(lab),
             "category_id": categories[int(lab)]["id"], "name": names[int(lab)]}
            for b, s, lab in zip(boxes, scores, labels)
        ]})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "detections.json").write_text(json.dumps(results, indent=1))
    return results


def _predict_file(model: RetinaNet, image: torch.Tensor, resize, device: str):
    """Detections of one [3, H, W] image in its own pixels."""
    if resize is None:
        return model.predict([image.to(device)])[0]
    resized = resize(tv_tensors.Image(image)).as_subclass(torch.Tensor)
    d = model.predict([resized.to(device)], resize=False)[0]
    sy, sx = resized.shape[-2] / image.shape[-2], resized.shape[-1] / image.shape[-1]
    scale = torch.tensor([sx, sy, sx, sy], device=d.boxes.device)
    return type(d)(d.boxes / scale, d.scores, d.labels)


# ----------------------------------------------------------------------------------------------------------------
def demo_config(output: str | Path = "runs/demo", **train_overrides: Any) -> RunConfig:
    """The demo: the small preset on the built-in synthetic shapes, sized to train in minutes on a 2-core CPU."""
    from retinanet.config import model_config
    from retinanet.train_config import train_config

    size = 128  # a multiple of the batch padding (128): no pixel is wasted
    data = DataConfig(format="synthetic", synthetic_image_size=size, synthetic_train_images=3000,
                      synthetic_val_images=200, synthetic_cache=True, train_min_sizes=(size,), max_size=size,
                      eval_min_size=size)  # fmt: skip
    train_cfg = train_config(**{
        "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "warmup_iters": 100, "warmup_factor": 0.01,
        "max_iters": 1600, "steps": (1300, 1500), "batch_size": 8, "grad_clip": 10.0, "amp": "none",
        "log_every": 20, "checkpoint_every": 400, "num_workers": 0, "device": "cpu", "output_dir": str(output),
        **train_overrides,
    })  # fmt: skip
    model = model_config("retinanet_tiny", min_size=size, max_size=size)
    return RunConfig(preset="retinanet_tiny", model=model, data=data, train=train_cfg)


def run_demo(output: str | Path = "runs/demo", **train_overrides: Any) -> dict[str, Any]:
    """Train, evaluate, draw: prints the COCO metrics and writes metrics.json (AP, AP50, AP75, APs, APm, APl,
    train_seconds), training_curves.png and annotated validation images under `output`."""
    cfg = demo_config(output, **train_overrides)
    out = Path(output)
    result = run_train(cfg, evaluate=False)
    model = result["model"].eval()
    val_set = build_dataset(cfg.data, "val", train_mode=False)
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
