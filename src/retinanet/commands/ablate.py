"""`retinanet ablate`: a grid of training runs, written as the paper's ablation tables."""

from __future__ import annotations

import argparse
import sys

from retinanet.analysis.ablate import run_grids
from retinanet.analysis.grids import load_grid, shipped_file
from retinanet.config import load_run_config
from retinanet.train import TrainingInterrupted

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    base = load_run_config(args.config or shipped_file("base.yaml"), args.set)
    source = args.config or "retinanet/analysis/grids/base.yaml (shipped)"
    try:
        outcome = run_grids(
            [load_grid(g) for g in args.grid],
            base,
            args.output,
            source,
            ["retinanet", *args.argv],
            args.cells,
            args.minutes,
        )
    except TrainingInterrupted as exc:  # the cell resumes from its checkpoint when the grid runs again
        print(f"retinanet: {exc}; continue with the same command", file=sys.stderr)
        return 130
    print(
        f"ablate: ran {len(outcome['ran'])} cells, {len(outcome['done'])} were done, "
        f"{len(outcome['held'])} run by other processes; tables in {args.output}"
    )
    return 0
