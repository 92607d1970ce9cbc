"""`retinanet train`: a run from its config (the job is retinanet.train.run_train)."""

from __future__ import annotations

import argparse

from retinanet.config import load_run_config
from retinanet.runtime.outputs import strict_json
from retinanet.train import run_train

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.set + (["data.skip_bad=true"] if args.skip_bad else []))
    result = run_train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"trained to iteration {result['iteration']}; checkpoint {result['checkpoint']}")
    if result.get("metrics"):
        print(strict_json(result["metrics"], indent=2))
    return 0
