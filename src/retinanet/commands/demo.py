"""`retinanet demo`: the small preset trained on the built-in synthetic shapes, evaluated and drawn, in minutes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from retinanet.config import DataConfig, RunConfig, model_config, parse_overrides, train_config
from retinanet.data import DetectionDataset, build_dataset
from retinanet.evaluation import evaluate_model
from retinanet.inference.drawing import save_detections_image
from retinanet.model import RetinaNet
from retinanet.runtime.outputs import write_json
from retinanet.train import run_train

__all__ = ["demo_config", "main", "run_demo"]


def demo_config(output: str | Path = "runs/demo", **train_overrides: Any) -> RunConfig:
    """The demo: the small preset on the built-in synthetic shapes, sized to train in minutes on a 2-core CPU."""
    size = 128  # the synthetic images' own size: no resizing
    data = DataConfig(
        format="synthetic",
        synthetic_image_size=size,
        synthetic_train_images=3000,
        synthetic_val_images=200,
        synthetic_cache=True,
    )
    train_cfg = train_config(
        **{
            "optimizer": "adamw",
            "lr": 5e-3,
            "weight_decay": 1e-4,
            "warmup_iters": 50,
            "warmup_factor": 0.01,
            "max_iters": 1800,
            "lr_schedule": "cosine",
            "batch_size": 8,
            "grad_clip": 10.0,
            "amp": "none",
            "log_every": 20,
            "checkpoint_every": 600,
            "num_workers": 0,
            "device": "cpu",
            "output_dir": str(output),
            **train_overrides,
        }
    )
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
    write_json(out / "metrics.json", summary, indent=2)
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


def main(args: argparse.Namespace) -> int:
    summary = run_demo(args.output, args.set)
    print("COCO metrics on the synthetic validation split:")
    for k, v in summary.items():
        print(f"  {k:>13}: {v:.4f}" if isinstance(v, float) else f"  {k:>13}: {v}")
    print(f"written to {Path(args.output) / 'metrics.json'}")
    return 0
