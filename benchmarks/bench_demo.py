"""The demo's figures: `retinanet demo` (small preset, synthetic shapes) trained and evaluated on this machine.

Targets on a 2-core CPU: training at most 5 minutes, COCO AP (0.5:0.95) at least 0.5 on the synthetic validation
split. Writes its section of BENCHMARKS.md.

    python benchmarks/bench_demo.py [--output runs/demo] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402

from retinanet.commands.demo import demo_config, run_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    summary = run_demo(args.output)
    cfg = demo_config(args.output)
    lines = [
        f"`retinanet demo`: {cfg.preset} ({cfg.model.backbone} at width {cfg.model.backbone_width or 64}) on "
        f"{cfg.data.synthetic_train_images} synthetic training images of "
        f"{cfg.data.synthetic_image_size}x{cfg.data.synthetic_image_size}, {cfg.train.max_iters} iterations "
        f"({cfg.train.lr_schedule} lr) of "
        f"batch {cfg.train.batch_size}, evaluated on {cfg.data.synthetic_val_images} validation images.",
        "",
        "| AP | AP50 | AP75 | APs | APm | APl | training time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        "| "
        + " | ".join(f"{summary[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
        + f" | {summary['train_seconds']:.0f} |",
        "",
        f"Targets: training at most 300 s ({'met' if summary['train_seconds'] <= 300 else 'MISSED'}), "
        f"AP at least 0.5 ({'met' if summary['AP'] >= 0.5 else 'MISSED'}).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("demo", "## The demo: train and evaluate on synthetic shapes\n\n" + text)


if __name__ == "__main__":
    main()
