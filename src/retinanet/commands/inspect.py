"""`retinanet inspect`: a split's images after the transforms, boxes coloured by their anchors, and statistics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from retinanet.config import RunConfig, load_run_config
from retinanet.data import build_dataset, categories_config, val_dataset, with_training_augmentation
from retinanet.tools.inspection import inspect_dataset, summary_line

__all__ = ["main", "run_inspect"]


def run_inspect(
    cfg: RunConfig,
    output: str | Path,
    split: str = "train",
    augment: bool = False,
    show_anchors: bool = False,
    limit: int | None = 64,
    only_missed: bool = False,
    draw: str = "auto",
) -> dict[str, Any]:
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
    return inspect_dataset(
        dataset, model_cfg, output, show_anchors=show_anchors, limit=limit, only_missed=only_missed, draw=draw
    )


def main(args: argparse.Namespace) -> int:
    result = run_inspect(
        load_run_config(args.config, args.set),
        args.output,
        args.split,
        args.augment,
        args.show_anchors,
        args.limit or None,
        args.only_missed,
        args.draw,
    )
    print(summary_line(result))
    print(f"images/, stats.json, stats.png and inspect.json in {args.output}")
    return 0
