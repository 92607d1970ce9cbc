"""`retinanet analyze`: the paper's analysis: loss curves (Figures 1, 5, 6), worked examples, the cumulative loss
distribution of a model (Figure 4)."""

from __future__ import annotations

import argparse

from retinanet.analysis.curves import examples_table, loss_examples, write_loss_curves
from retinanet.analysis.loss_cdf import describe, run_loss_cdf
from retinanet.config import load_run_config

__all__ = ["examples_main", "loss_cdf_main", "loss_curves_main"]


def loss_curves_main(args: argparse.Namespace) -> int:
    for path in write_loss_curves(args.output, args.points):
        print(path)
    return 0


def examples_main(args: argparse.Namespace) -> int:
    print(examples_table(loss_examples(args.p, args.alpha, args.gamma), args.alpha, args.gamma))
    return 0


def loss_cdf_main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.set)
    result = run_loss_cdf(
        args.checkpoint, cfg.data, args.output, args.gammas, args.device, args.batch_size, args.max_images
    )
    print(describe(result))
    print(f"written to {args.output}: loss_cdf.png, loss_cdf.csv, loss_cdf.json")
    return 0
