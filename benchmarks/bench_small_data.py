"""The small-data recipe on real images: from scratch, on 2 CPU cores, within 30 minutes of training, against
YOLOv8n from scratch trained for the same time on the same tiles.

The data: the real development set of benchmarks/real_trees.py (NEON tree crowns from the deepforest wheel: 88
training tiles of 400 px from one Yellowstone orthophoto, validated on a held-out strip of it (12 tiles, 204 crowns)
and on SOAP_061, another site (37 crowns)); built once under --data. The recipe: examples/small_objects.yaml, the
README's recipe for a user with a few hundred images of small objects and no pretrained weights, its data section
pointed at the development set. Each of our runs is `retinanet train` as a user runs it; the table gives its
validation AP, AP50 and AR100 on both splits (our COCO evaluation, from its best.pt and last.pt) and the training time
(evaluation excluded), read from the run's own files. YOLOv8n (benchmarks/yolo_baseline.py) trains for the same
number of minutes; its detections go through the same evaluation.

    python benchmarks/bench_small_data.py [--data runs/real_trees] [--output runs/small_data] [--minutes 30]
        [--no-yolo] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_trees  # noqa: E402
import yolo_baseline  # noqa: E402
from common import ROOT, write_section  # noqa: E402

RECIPE = ROOT / "examples" / "small_objects.yaml"


def train(config: Path, overrides: list[str], output: Path) -> dict:
    """`retinanet train` in its own process; the training seconds it reports and how it ended."""
    cmd = [sys.executable, "-m", "retinanet.cli", "train", "--config", str(config), "--set", *overrides,
           f"train.output_dir={output}", "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ended = "finished" if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1][:200]
    log = [json.loads(x) for x in (output / "log.jsonl").read_text().splitlines()] if (output / "log.jsonl").exists() else []
    evals = [r for r in log if "eval/AP" in r]
    return {"train_seconds": _train_seconds(output, wall), "ended": ended, "command": " ".join(cmd[1:]),
            "iterations": max((r["iter"] for r in log), default=0),
            "curve": [(r["iter"], r["eval/AP50"], r.get("eval/train_AP50")) for r in evals]}  # fmt: skip


def _train_seconds(output: Path, wall: float) -> float:
    """The training time the run's train.log reports (evaluation not counted), else the command's wall time."""
    notes = (output / "train.log").read_text().splitlines() if (output / "train.log").exists() else []
    for line in reversed(notes):
        if " trained iterations " in line:
            return float(line.split(" in ")[1].split(" s ")[0])
    return wall


def evaluate(checkpoint: Path, data: Path, split: str, output: Path) -> dict:
    """`retinanet eval` of a checkpoint on a development split: AP, AP50, AR100."""
    config = output / f"eval_{split}.yaml"
    config.write_text(json.dumps({"data": real_trees.data_config(data, split)}))
    subprocess.run([sys.executable, "-m", "retinanet.cli", "eval", "--checkpoint", str(checkpoint), "--config",
                    str(config), "--output", str(output / f"eval_{checkpoint.stem}_{split}")], check=True,
                   capture_output=True)  # fmt: skip
    metrics = json.loads((output / f"eval_{checkpoint.stem}_{split}" / "metrics.json").read_text())
    return {k: metrics[k] for k in ("AP", "AP50", "AR100")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/real_trees"))
    parser.add_argument("--output", type=Path, default=Path("runs/small_data"))
    parser.add_argument("--minutes", type=float, default=30.0, help="YOLO's training time")
    parser.add_argument("--no-yolo", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    splits = real_trees.build(args.data)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    dev = [f"data.{k}={v}" for k, v in real_trees.data_config(args.data).items()]
    ours = train(RECIPE, dev, out / "recipe")
    rows = {}
    for name in ("best", "last"):
        rows[f"ours, the recipe ({name}.pt)"] = {"minutes": ours["train_seconds"] / 60, **{
            split: evaluate(out / "recipe" / f"{name}.pt", args.data, split, out) for split in ("val", "val_soap")}}
    if not args.no_yolo:
        spec = yolo_baseline.yolo_dataset(args.data, out / "yolo" / "data")
        weights, seconds = yolo_baseline.train_yolo(spec, out / "yolo", args.minutes)
        rows["YOLOv8n from scratch (Ultralytics defaults)"] = {"minutes": seconds / 60, **{
            split: yolo_baseline.evaluate_yolo(weights, args.data, split) for split in ("val", "val_soap")}}
    sizes = {s["split"]: s for s in splits}
    lines = [f"Data: benchmarks/real_trees.py, the real development set: {sizes['train']['images']} training tiles of "
             f"400 px ({sizes['train']['boxes']} crowns) of one Yellowstone orthophoto; validation on a held-out strip "
             f"of it ({sizes['val']['images']} tiles, {sizes['val']['boxes']} crowns) and on SOAP_061, another site "
             f"({sizes['val_soap']['boxes']} crowns). One class; from scratch (no pretrained weights); both scored by "
             "our COCO evaluation.", "",
             "| detector | training (min) | AP | AP50 | AR100 | AP (other site) | AP50 (other site) |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in rows.items():
        v, s = r["val"], r["val_soap"]
        lines.append(f"| {name} | {r['minutes']:.1f} | {v['AP']:.3f} | {v['AP50']:.3f} | {v['AR100']:.3f} | "
                     f"{s['AP']:.3f} | {s['AP50']:.3f} |")  # fmt: skip
    best = rows["ours, the recipe (best.pt)"]
    lines += ["", "Validation AP50 during our training (held-out strip; the training tiles' beside it): " + ", ".join(
        f"{it}: {v:.3f} ({t:.3f})" for it, v, t in ours["curve"])]  # fmt: skip
    lines += ["", f"Target: validation AP50 >= 0.5 within 30 minutes of training on 2 CPU cores: AP50 "
              f"{best['val']['AP50']:.3f} in {best['minutes']:.1f} minutes "
              f"({'met' if best['val']['AP50'] >= 0.5 and best['minutes'] <= 30 else 'MISSED'})."]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "ours": ours}, indent=1))
    if not args.no_write:
        write_section("small-data", "## The small-data recipe on real images, against YOLOv8n\n\n" + text)


if __name__ == "__main__":
    main()
