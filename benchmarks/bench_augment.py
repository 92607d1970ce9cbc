"""What photometric jitter costs a data worker: torchvision's ColorJitter (with and without hue, whose HSV round trip
is the costly part) against ours (retinanet.data.augment.ColorMatrixJitter: one 3 x 3 colour matrix per image), and
the whole `top_down` training transform of a 400 px tile with and without hue jitter. One thread, as a DataLoader
worker runs; milliseconds per image, medians of interleaved rounds.

    python benchmarks/bench_augment.py [--size 400] [--repeats 30] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median_times, machine_line, write_section  # noqa: E402

from retinanet.data.augment import PRESETS, ColorMatrixJitter  # noqa: E402
from retinanet.data.transforms import train_transforms  # noqa: E402

STRENGTH = 0.25  # brightness, contrast and saturation of the top_down preset
HUE = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.size
    image = tv_tensors.Image(torch.randint(0, 256, (3, n, n), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[10.0, 10, 60, 60], [100, 120, 140, 170]]), format="XYXY", canvas_size=(n, n)
    )
    target = {"boxes": boxes, "labels": torch.tensor([0, 0]), "iscrowd": torch.zeros(2, dtype=torch.bool)}
    jitters = {
        "torchvision ColorJitter, brightness/contrast/saturation": v2.ColorJitter(STRENGTH, STRENGTH, STRENGTH),
        f"torchvision ColorJitter, + hue {HUE}": v2.ColorJitter(STRENGTH, STRENGTH, STRENGTH, HUE),
        f"ours (ColorMatrixJitter), + hue {HUE}": ColorMatrixJitter(STRENGTH, STRENGTH, STRENGTH, HUE),
    }
    top_down = PRESETS["top_down"]
    pipelines = {
        "top_down training transform, as shipped": train_transforms((n,), n, top_down),
        f"top_down training transform, + hue {HUE} (ours)": train_transforms(
            (n,), n, dataclasses.replace(top_down, hue=HUE)
        ),
    }
    fns = {name: (lambda t=t: t(image)) for name, t in jitters.items()}
    fns |= {name: (lambda t=t: t(image, target)) for name, t in pipelines.items()}
    times = dict(zip(fns, interleaved_median_times(list(fns.values()), repeats=args.repeats)))
    lines = [
        f"One {n} x {n} uint8 image, one thread (a data worker's), medians of {args.repeats} interleaved rounds. "
        f"{machine_line()}.",
        "",
        "| operation | ms per image |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {1000 * t:.1f} |" for name, t in times.items()]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("augment", "## Photometric jitter on a CPU: what a data worker pays per image\n\n" + text)


if __name__ == "__main__":
    main()
