"""`retinanet anchors`: how the training boxes are covered by the model's anchors, and anchors fitted to them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from retinanet.config import RunConfig, load_run_config
from retinanet.data import build_dataset, categories_config
from retinanet.runtime.outputs import writable_folder
from retinanet.tools import anchor_report
from retinanet.tools.anchor_report import summary_lines

__all__ = ["main", "run_anchors"]


def run_anchors(cfg: RunConfig, output: str | Path, fit: bool = False, max_anchors: int = 9) -> dict[str, Any]:
    """`retinanet anchors`: how the training boxes are covered by the model's anchors (retinanet.tools.anchor_report),
    with `fit` anchors fitted to them; writes anchors.json, anchors.png (and anchors_fit.yaml) in `output`."""
    writable_folder(output, "anchor report")
    train_set = build_dataset(cfg.data, cfg.model, "train", train_mode=True)
    model_cfg = categories_config(cfg.model, train_set)
    return anchor_report.write_report(train_set.records, model_cfg, output, fit=fit, max_anchors=max_anchors)


def main(args: argparse.Namespace) -> int:
    summary = run_anchors(load_run_config(args.config, args.set), args.output, args.fit, args.max_anchors)
    print("\n".join(summary_lines(summary, Path(args.output))))
    return 0
