"""bfloat16 against float32 on this CPU: the demo trained and evaluated in each precision, AP and training time.

`amp: auto` may become the default only where it keeps accuracy (within 1 AP point of float32) on the demo and on
the real development set (bench_small_data.py trains the recipe in both precisions). On a CPU without native
bfloat16 there is nothing to compare: the section says so.

    python benchmarks/bench_precision.py [--output runs/precision] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_section  # noqa: E402

from retinanet.commands.demo import demo_config, run_demo  # noqa: E402
from retinanet.runtime import fastpath  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/precision"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cpu = fastpath.cpu_info()
    cfg = demo_config()
    lines = [
        f"`retinanet demo` ({cfg.train.max_iters} iterations of batch {cfg.train.batch_size}, evaluated on "
        f"{cfg.data.synthetic_val_images} validation images) trained and evaluated in each precision "
        f"(`--set train.amp=...`); {machine_line()}.",
        "",
    ]
    if not cpu.native_bf16:
        lines.append(
            f"This CPU ({cpu.describe()}) has no native bfloat16: `amp: auto` runs float32 here, nothing to compare."
        )
    else:
        rows = {amp: run_demo(args.output / amp, [f"train.amp={amp}"]) for amp in ("none", "bf16")}
        lines += ["| precision | AP | AP50 | AP75 | training time (s) |", "|---|---:|---:|---:|---:|"]
        for amp, r in rows.items():
            name = {"none": "float32", "bf16": "bfloat16 (autocast)"}[amp]
            lines.append(f"| {name} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | {r['train_seconds']:.0f} |")
        gap = 100 * (rows["bf16"]["AP"] - rows["none"]["AP"])
        speed = rows["none"]["train_seconds"] / rows["bf16"]["train_seconds"]
        lines += [
            "",
            f"bfloat16 - float32: {gap:+.1f} AP points ({'within' if abs(gap) <= 1 else 'NOT within'} 1 "
            f"point); training {speed:.2f}x as fast.",
        ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("precision", "## bfloat16 against float32: the demo\n\n" + text)


if __name__ == "__main__":
    main()
