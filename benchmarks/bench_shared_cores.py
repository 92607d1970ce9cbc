"""Two trainings started together on the same cores, against one alone: what a user running an evaluation beside a
training, or two ablation cells, pays. Each training is `retinanet train` of retinanet_tiny on the synthetic shapes
(256 px, 120 iterations, batch 4), in its own process; wall times are medians over --repeats rounds.

    python benchmarks/bench_shared_cores.py [--iterations 120] [--repeats 2] [--no-write]

Fair sharing is 2x the time of one alone (each gets half the cores); the target is at most 2.3x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_section  # noqa: E402


def command(output: Path, iterations: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "retinanet.cli",
        "train",
        "--set",
        "model.preset=retinanet_tiny",
        "model.min_size=256",
        "model.max_size=256",
        "data.synthetic_train_images=64",
        "data.synthetic_val_images=4",
        "data.synthetic_image_size=256",
        f"train.max_iters={iterations}",
        "train.batch_size=4",
        "train.eval_every=100000",
        "train.log_every=1000",
        f"train.output_dir={output}",
        "--overwrite",
    ]


def run_together(folder: Path, count: int, iterations: int, env: dict[str, str]) -> list[float]:
    """Start `count` trainings at once; each one's wall time."""
    procs, starts = [], []
    for i in range(count):
        starts.append(time.perf_counter())
        procs.append(
            subprocess.Popen(
                command(folder / f"run{i}", iterations),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    times = [0.0] * count
    pending = set(range(count))
    while pending:
        for i in list(pending):
            if procs[i].poll() is not None:
                times[i] = time.perf_counter() - starts[i]
                if procs[i].returncode != 0:
                    raise SystemExit(procs[i].stderr.read()[-2000:])
                pending.discard(i)
        time.sleep(0.05)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_shared_cores"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    env = dict(os.environ)
    alone, together = [], []
    for _ in range(args.repeats):
        alone += run_together(args.work / "alone", 1, args.iterations, env)
        pair = run_together(args.work / "pair", 2, args.iterations, env)
        together.append(max(pair))
        print(f"alone {alone[-1]:.1f} s; together {pair[0]:.1f} s and {pair[1]:.1f} s", flush=True)
    one, two = statistics.median(alone), statistics.median(together)
    lines = [
        f"`retinanet train`, retinanet_tiny on the synthetic shapes at 256 px, {args.iterations} iterations of "
        f"batch 4, each in its own process with the project's defaults (its thread settings included); "
        f"medians of {args.repeats} rounds. {machine_line()}.",
        "",
        "| trainings at once | wall time of the slower (s) | x the time of one alone |",
        "|---:|---:|---:|",
        f"| 1 | {one:.1f} | 1.00 |",
        f"| 2 | {two:.1f} | {two / one:.2f} |",
        "",
        f"Fair sharing of the cores is 2x; the target is at most 2.3x: {'met' if two / one <= 2.3 else 'missed'}.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("shared_cores", "## Two trainings on the same cores\n\n" + text)


if __name__ == "__main__":
    main()
