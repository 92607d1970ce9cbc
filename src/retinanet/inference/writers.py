"""The files of a detection, written image by image: detections.json and results.json streamed
(retinanet.runtime.outputs: under temporary names until every image is done), keras-retinanet's CSV and Ultralytics'
labels/NAME.txt."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from retinanet.data.coco_format import coco_results
from retinanet.inference.predictor import Prediction
from retinanet.runtime.outputs import JsonList, atomic_stream, atomic_write, writing

__all__ = ["DetectionWriter", "YoloTxtWriter", "csv_rows", "write_csv", "write_yolo_txt"]


class DetectionWriter:
    """The files of a detection, each written as the images come (retinanet.runtime.outputs.atomic_stream: under a
    temporary name until the run's end); labels/NAME.txt one per image in a temporary folder until the end."""

    def __init__(
        self, streams: contextlib.ExitStack, out: Path, categories: list[dict[str, Any]], csv_file: bool, yolo_txt: bool
    ):
        self.out, self.categories = out, categories
        self.detections = JsonList(streams.enter_context(atomic_stream(out / "detections.json")), indent=1)
        self.results = JsonList(streams.enter_context(atomic_stream(out / "results.json")))
        self.csv = csv.writer(_Text(streams.enter_context(atomic_stream(out / "detections.csv")))) if csv_file else None
        self.yolo = streams.enter_context(YoloTxtWriter(out / "labels")) if yolo_txt else None

    def add(self, record: dict[str, Any], found: Prediction) -> None:
        self.detections.add(record)
        one = {"image_id": record["image_id"], "boxes": found.boxes, "scores": found.scores, "labels": found.labels}
        for row in coco_results([one], self.categories):
            self.results.add(row)
        if self.csv is not None:
            self.csv.writerows(csv_rows(record))
        if self.yolo is not None:
            self.yolo.add(record)

    def finish(self, skipped: list[tuple[str, str]]) -> list[Path]:
        """Close the lists (detections.json ends with the files left out); the files the run writes. They take
        their names when the caller's ExitStack closes."""
        for file, reason in skipped:
            self.detections.add({"file": file, "skipped": reason, "detections": []})
        self.detections.close()
        self.results.close()
        written = [self.out / "detections.json", self.out / "results.json"]
        if skipped:
            written.append(
                atomic_write(
                    self.out / "skipped.json", json.dumps([{"file": f, "reason": r} for f, r in skipped], indent=1)
                )
            )
        if self.csv is not None:
            written.append(self.out / "detections.csv")
        return written + (self.yolo.written if self.yolo is not None else [])


class _Text:
    """A binary file as the text file csv.writer wants (UTF-8, no newline translation)."""

    def __init__(self, file: IO[bytes]):
        self.file = file

    def write(self, text: str) -> int:
        return self.file.write(text.encode("utf-8"))


def write_csv(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """keras-retinanet's annotation layout of `records` (as in detections.json): `csv_rows` of each."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        for record in records:
            writer.writerows(csv_rows(record))
    return path


def csv_rows(record: dict[str, Any]) -> list[list[Any]]:
    """One image's rows in keras-retinanet's layout: `path,x1,y1,x2,y2,class_name` per box, in the whole pixels that
    contain it (keras-retinanet reads integers); `path,,,,,` for an image with no detections (or only boxes of no
    width or height, which the layout cannot hold)."""
    rows = []
    for d in record["detections"]:
        x1, y1 = (math.floor(v) for v in d["box"][:2])
        x2, y2 = (math.ceil(v) for v in d["box"][2:])
        if x2 > x1 and y2 > y1:
            rows.append([record["file"], x1, y1, x2, y2, d["name"]])
    return rows or [[record["file"], "", "", "", "", ""]]


def write_yolo_txt(folder: str | Path, records: list[dict[str, Any]]) -> list[Path]:
    """Ultralytics' prediction layout of `records` (as in detections.json) in `folder`: NAME.txt per image (its
    file's stem; a stem met before gets _2, _3, ...), one detection per line `class cx cy w h score`, the class the
    0-based label and the box as fractions of the image's size; an empty file for an image with no detections.
    Returns the files written."""
    with YoloTxtWriter(Path(folder)) as writer:
        for record in records:
            writer.add(record)
    return writer.written


class YoloTxtWriter:
    """write_yolo_txt one image at a time, as a context: the files go to a temporary folder beside `folder` and
    take their places in it when the block ends without an error (else they are removed): an earlier detection's
    labels stay whole until this one has written all of its own. `written`: their final paths."""

    def __init__(self, folder: Path):
        self.folder, self.taken, self.written = folder, {}, []
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))

    def __enter__(self) -> "YoloTxtWriter":
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        try:
            if kind is None:
                with writing(self.folder):
                    self.folder.mkdir(exist_ok=True)
                    for path in self.written:
                        os.replace(self.staging / path.name, path)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def add(self, record: dict[str, Any]) -> None:
        stem = Path(record["file"]).stem
        self.taken[stem] = self.taken.get(stem, 0) + 1
        name = stem if self.taken[stem] == 1 else f"{stem}_{self.taken[stem]}"
        width, height = record["width"], record["height"]
        lines = []
        for d in record["detections"]:
            x1, y1, x2, y2 = d["box"]
            cx, cy, w, h = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
            lines.append(f"{d['label']} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f} {d['score']:.6f}\n")
        with writing(self.folder / f"{name}.txt"):
            (self.staging / f"{name}.txt").write_text("".join(lines))
        self.written.append(self.folder / f"{name}.txt")
