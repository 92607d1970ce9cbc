"""keras-retinanet CSV in.

annotations csv, one object per line, no header:
    path/to/image.jpg,x1,y1,x2,y2,class_name      (x1, y1, x2, y2: XYXY absolute pixels, x2 > x1, y2 > y1)
    path/to/empty.jpg,,,,,                        (an image with no objects)
classes csv (optional), one class per line: class_name,id

Relative image paths are resolved against `root`, by default the annotations csv's folder. Without a classes
csv the classes are the names met in the annotations, sorted, with ids 1..K: give a classes csv whenever
train and val must share a label map. The csv states no image sizes, so boxes are checked against the image
when it is loaded. image_id is the image's position in order of first appearance.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retinanet.data.base import DatasetError, DetectionDataset, ImageRecord, Skip, Transforms, box_problems, report_bad

__all__ = ["CsvDetection", "read_classes_csv"]


def _rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line; raises DatasetError for a missing or empty file."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    if not rows:
        raise DatasetError(f"{path}: empty file; expected {what} lines")
    return rows


def read_classes_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read `class_name,id` lines -> categories [{"id", "name"}] sorted by id."""
    path = Path(path)
    categories: list[dict[str, Any]] = []
    for line, row in _rows(path, "classes csv (class_name,id)"):
        try:
            name, cat_id = row[0].strip(), int(row[1])
            if len(row) != 2 or not name:
                raise ValueError
        except (ValueError, IndexError):
            raise DatasetError(f"{path}: line {line}: {','.join(row)!r}; expected 'class_name,id'") from None
        categories.append({"id": cat_id, "name": name})
    for key in ("id", "name"):
        values = [c[key] for c in categories]
        if len(set(values)) != len(values):
            raise DatasetError(f"{path}: duplicate class {key}s in {values}")
    return sorted(categories, key=lambda c: c["id"])


@dataclass
class _Image:
    index: int
    path: Path
    lines: list[int] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def _parse_line(path: Path, line: int, row: list[str]) -> tuple[str, list[float] | None, str | None]:
    """One annotation line -> (image path, box XYXY or None for an empty image, class name or None)."""
    if len(row) != 6 or not row[0].strip():
        raise DatasetError(
            f"{path}: line {line}: {','.join(row)!r}; expected 'path,x1,y1,x2,y2,class_name' or 'path,,,,,'"
        )
    fields = [cell.strip() for cell in row]
    if not any(fields[1:]):
        return fields[0], None, None
    try:
        box = [float(v) for v in fields[1:5]]
    except ValueError:
        raise DatasetError(f"{path}: line {line}: coordinates {fields[1:5]}; expected four numbers") from None
    if not fields[5]:
        raise DatasetError(f"{path}: line {line}: no class name")
    return fields[0], box, fields[5]


class CsvDetection(DetectionDataset):
    """A dataset in the keras-retinanet CSV layout (see the module docstring).

    annotations_csv: lines `path,x1,y1,x2,y2,class_name` or `path,,,,,`.
    classes_csv: lines `class_name,id`; None to take `categories`, or without those the sorted class names of the
        annotations, ids 1..K.
    categories: [{"id", "name"}] in label order, e.g. the training set's for its validation set, so that both
        map names to the same labels (a name that is not among them is an error naming its line).
    root: folder that relative image paths are resolved against; the annotations csv's folder by default.
    transforms: (image, target) -> (image, target). skip_bad: drop bad boxes and unreadable images (one line each,
        kept in `skipped`) instead of raising.
    """

    def __init__(
        self,
        annotations_csv: str | Path,
        classes_csv: str | Path | None = None,
        root: str | Path | None = None,
        transforms: Transforms | None = None,
        skip_bad: bool = False,
        categories: list[dict[str, Any]] | None = None,
    ) -> None:
        if classes_csv is not None and categories is not None:
            raise ValueError("give a classes csv or categories, not both")
        self.annotations_csv = Path(annotations_csv)
        self.root = Path(root) if root is not None else self.annotations_csv.parent
        images, problems = self._read(self.annotations_csv)
        if classes_csv is not None:
            categories = read_classes_csv(classes_csv)
        elif categories is not None:
            categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]
        else:
            names = sorted({n for img in images.values() for n in img.names})
            categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
        name_to_label = {c["name"]: label for label, c in enumerate(categories)}
        records = [self._record(img, name_to_label, problems) for img in images.values()]
        skipped = report_bad(problems, skip_bad)
        super().__init__(categories, records, transforms=transforms, skip_bad=skip_bad, skipped=skipped)

    def _read(self, path: Path) -> tuple[dict[str, _Image], list[Skip]]:
        """Group the lines by image; a line that cannot be read is a problem of its own (its box alone is lost)."""
        images: dict[str, _Image] = {}
        problems: list[Skip] = []
        for line, row in _rows(path, "annotation (path,x1,y1,x2,y2,class_name)"):
            key = row[0].strip() if row else ""
            try:
                key, box, name = _parse_line(path, line, row)
            except DatasetError as e:
                problems.append(Skip(str(self.root / key) if key else str(path), None, str(e), box=bool(key)))
                continue
            img = images.setdefault(key, _Image(index=len(images), path=self.root / key))
            if box is not None:
                img.lines.append(line)
                img.boxes.append(box)
                img.names.append(name)  # type: ignore[arg-type]
        return images, problems

    def _record(self, img: _Image, name_to_label: dict[str, int], problems: list[Skip]) -> ImageRecord:
        """The image's record without the boxes that have a problem (unknown class, x2 <= x1, ...), which are
        added to `problems` (their image keeps its other boxes). Bounds are checked against the image's header by
        check_images."""
        where = f"{self.annotations_csv}: image {img.index} ('{img.path.name}')"
        boxes = torch.tensor(img.boxes, dtype=torch.float32).reshape(-1, 4)
        bad = dict(box_problems(boxes, None, None, where, [f"line {line}" for line in img.lines]))
        for j, (name, line) in enumerate(zip(img.names, img.lines)):
            if name not in name_to_label:
                bad.setdefault(
                    j,
                    f"{self.annotations_csv}: line {line}: unknown class {name!r}; "
                    f"expected one of {sorted(name_to_label)}",
                )
        problems += [Skip(str(img.path), img.index, why, box=True) for _, why in sorted(bad.items())]
        keep = [j for j in range(len(img.names)) if j not in bad]
        return ImageRecord(
            path=img.path,
            image_id=img.index,
            boxes=boxes[keep].reshape(-1, 4),
            labels=torch.tensor([name_to_label[img.names[j]] for j in keep], dtype=torch.int64),
            iscrowd=torch.zeros(len(keep), dtype=torch.bool),
            width=None,
            height=None,
            where=where,
            box_names=[f"line {img.lines[j]}" for j in keep],
        )
