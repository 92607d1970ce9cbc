"""The localisation grid (`retinanet ablate --grid localisation`) on the real development set, at equal training time:
IoU-aware classification losses (QFL, VFL), IoU box losses (GIoU, CIoU), ATSS, hue and scale jitter, each on top of
the small-data recipe (examples/small_objects.yaml), judged on the held-out strip of the training orthophoto and on
SOAP_061, another site.

    python benchmarks/bench_localisation.py [--data runs/real_trees] [--output runs/localisation] [--minutes 8]
        [--cells baseline giou ...] [--no-write]

Each cell is `retinanet ablate` as a user runs it on their own config; the table (AP, AP50, AP75 and TIDE's dAP50
loc per validation set, and the training minutes) is ablate's own, copied into BENCHMARKS.md. Cells that finished
in --output are not trained again (ablate's rule), so the command continues where it stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_trees  # noqa: E402
from common import ROOT, machine_line, write_section  # noqa: E402

RECIPE = ROOT / "examples" / "small_objects.yaml"


def base_config(data: Path, output: Path) -> Path:
    """The recipe with its data section pointed at the development set (the strip first, SOAP_061 beside it)."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"] = {**recipe["data"], **real_trees.data_config(data)}
    recipe["data"].pop("val_split", None)
    recipe["train"].pop("max_iters", None)
    path = output / "base.yaml"
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/real_trees"))
    parser.add_argument("--output", type=Path, default=Path("runs/localisation"))
    parser.add_argument("--minutes", type=float, default=8.0, help="training time of every cell")
    parser.add_argument("--cells", nargs="+", help="run only these cells")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    real_trees.build(args.data)
    config = base_config(args.data, args.output)
    cmd = [
        sys.executable,
        "-m",
        "retinanet.cli",
        "ablate",
        "--grid",
        "localisation",
        "--config",
        str(config),
        "--minutes",
        str(args.minutes),
        "--output",
        str(args.output),
        *(["--cells", *args.cells] if args.cells else []),
    ]
    subprocess.run(cmd, check=True)
    table = (args.output / "localisation.md").read_text()
    text = (
        f"Data: benchmarks/real_trees.py (88 training tiles of one Yellowstone orthophoto; `val`: the held-out strip "
        f"of it, 12 tiles, 204 crowns; `other_site`: SOAP_061, 37 crowns). Every cell: examples/small_objects.yaml "
        f"with the cell's change, {args.minutes:g} minutes of training on this machine (train.minutes), one seed; "
        f"AP in %. {machine_line()}.\n\n" + table.split("\n", 1)[1].strip()
    )
    print(text)
    if not args.no_write:
        write_section("localisation", "## Boxes that fit: the localisation grid on real images\n\n" + text)


if __name__ == "__main__":
    main()
