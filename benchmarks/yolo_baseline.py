"""The tool a practitioner would pick instead: Ultralytics YOLOv8n or YOLO11n from scratch on the same tiles, for a
given training time, its detections scored by our COCO evaluation (and our error decomposition) as ours are.

    python benchmarks/yolo_baseline.py --data runs/real_trees --minutes 30 [--output runs/yolo] [--model yolo11n]

The model is built from its architecture file (yolov8n.yaml, yolo11n.yaml: no pretrained weights, nothing
downloaded) and trained
with Ultralytics' defaults (SGD/auto optimiser, mosaic, HSV, scale and translate jitter, flips, EMA) on the
development set's training tiles, converted to its label format; `time` bounds its training (validation during
training is off, so that all the time goes to training, as ours counts its training time). Its images are 416 px
(the multiple of 32 that holds our 400 px tiles). Prediction keeps every detection above 0.001 (at most 100 per
image), as COCO evaluation expects.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_trees  # noqa: E402

from retinanet.evaluation import evaluate_coco  # noqa: E402
from retinanet.evaluation.errors import ERROR_TYPES, analyze_errors  # noqa: E402

IMAGE_SIZE = 416


def yolo_dataset(data: Path, folder: Path) -> Path:
    """The development set in Ultralytics' layout (images linked, labels as normalised cx cy w h), and its YAML."""
    for split in ("train", "val", "val_soap"):
        coco = json.loads((data / f"{split}.json").read_text())
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
        boxes: dict[int, list] = {}
        for a in coco["annotations"]:
            boxes.setdefault(a["image_id"], []).append(a["bbox"])
        for image in coco["images"]:
            link = folder / "images" / split / image["file_name"]
            if not link.exists():
                link.symlink_to((data / "images" / image["file_name"]).resolve())
            w, h = image["width"], image["height"]
            lines = [
                f"0 {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                for x, y, bw, bh in boxes.get(image["id"], [])
            ]
            (folder / "labels" / split / f"{Path(image['file_name']).stem}.txt").write_text("\n".join(lines))
    spec = folder / "trees.yaml"
    spec.write_text(f"path: {folder.resolve()}\ntrain: images/train\nval: images/val\nnames:\n  0: tree\n")
    return spec


def train_yolo(spec: Path, output: Path, minutes: float, seed: int = 0, name: str = "yolov8n") -> tuple[Path, float]:
    """YOLO `name` (yolov8n, yolo11n) from scratch for `minutes` of training; (its last weights, the training seconds
    measured)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    model = YOLO(f"{name}.yaml")
    t0 = time.perf_counter()
    # an absolute project folder: Ultralytics puts a relative one under its own runs_dir setting
    model.train(
        data=str(spec),
        epochs=10_000,
        time=minutes / 60,
        imgsz=IMAGE_SIZE,
        batch=8,
        device="cpu",
        workers=1,
        pretrained=False,
        amp=False,
        plots=False,
        val=False,
        seed=seed,
        project=str(output.resolve()),
        name="train",
        exist_ok=True,
        verbose=False,
    )
    wall = time.perf_counter() - t0
    weights, seconds = trained_yolo(output)
    return weights, seconds or wall


def trained_yolo(output: Path) -> tuple[Path, float | None]:
    """The weights of a YOLO training in `output` (last.pt, else best.pt) and its training seconds as its
    results.csv gives them (the elapsed time at its last epoch; None without the file)."""
    folder = output / "train"
    weights = folder / "weights" / "last.pt"
    weights = weights if weights.exists() else folder / "weights" / "best.pt"
    results = folder / "results.csv"
    if not results.exists():
        return weights, None
    rows = list(csv.DictReader(results.read_text().splitlines()))
    return weights, (float(rows[-1]["time"]) if rows and "time" in rows[-1] else None)


def evaluate_yolo(weights: Path, data: Path, split: str) -> dict[str, float]:
    """COCO metrics (ours: retinanet.evaluation) of a YOLO model's detections on a development split, and the AP50
    each error type costs (ours: retinanet.evaluation.errors), "dAP50_loc" etc."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    coco = json.loads((data / f"{split}.json").read_text())
    gts, dets = [], []
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        gts.append(
            {
                "image_id": image["id"],
                "boxes": boxes,
                "labels": torch.zeros(len(anns), dtype=torch.int64),
                "width": image["width"],
                "height": image["height"],
            }
        )
        found = model.predict(
            str(data / "images" / image["file_name"]),
            imgsz=IMAGE_SIZE,
            conf=0.001,
            max_det=100,
            device="cpu",
            verbose=False,
        )[0].boxes
        dets.append(
            {
                "image_id": image["id"],
                "boxes": found.xyxy.float(),
                "scores": found.conf.float(),
                "labels": found.cls.long(),
            }
        )
    metrics = evaluate_coco(gts, dets, [{"id": 1, "name": "tree"}])
    errors = analyze_errors(gts, dets)
    return {k: float(getattr(metrics, k)) for k in ("AP", "AP50", "AP75", "AR100")} | {
        f"dAP50_{k}": errors.dap[k]["50"] for k in ERROR_TYPES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("runs/real_trees"))
    parser.add_argument("--output", type=Path, default=Path("runs/yolo"))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--model", default="yolov8n", choices=["yolov8n", "yolo11n"])
    args = parser.parse_args()
    real_trees.build(args.data)
    spec = yolo_dataset(args.data, args.output / "data")
    weights, seconds = train_yolo(spec, args.output, args.minutes, name=args.model)
    result = {
        "train_seconds": seconds,
        **{split: evaluate_yolo(weights, args.data, split) for split in ("val", "val_soap")},
    }
    (args.output / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
