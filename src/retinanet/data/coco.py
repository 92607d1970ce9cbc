"""COCO instances JSON in and out.

COCO's bbox is [x, y, w, h] in absolute pixels; it becomes XYXY on the way in and goes back to XYWH in `to_coco_dict`
on the way out, both by retinanet.ops.boxes' conversions (the format's other direction, detections as a COCO results
list, is retinanet.data.coco_format). Categories are sorted by their COCO id and numbered
0..K-1 (COCO's 80 ids run 1..90 with gaps). Images without annotations are kept, with no boxes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from retinanet.data.base import (
    DatasetError,
    DetectionDataset,
    ImageRecord,
    Skip,
    Transforms,
    box_problems,
    report_bad,
    without_boxes,
)
from retinanet.ops.boxes import xywh_to_xyxy, xyxy_to_xywh
from retinanet.runtime.outputs import atomic_write

__all__ = ["CocoDetection", "parse_coco", "read_json", "to_coco_dict", "write_coco"]


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing, empty or invalid file raises DatasetError naming it (and the line)."""
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetError(f"{path}: empty file; expected a COCO instances JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def _require_keys(path: Path, entry: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: {what}: expected a JSON object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(f"{path}: {what}: missing key(s) {missing}; expected {list(keys)}")


def _int(path: Path, where: str, key: str, value: Any) -> int:
    """An integer field of the JSON, or a DatasetError naming the file, the entry and the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DatasetError(f"{path}: {where}: '{key}' is {value!r}; expected an integer")
    return int(value)


def _parse_categories(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(data["categories"], list) or not data["categories"]:
        raise DatasetError(f"{path}: 'categories' must be a non-empty list of {{'id': int, 'name': str}}")
    categories = []
    for k, cat in enumerate(data["categories"]):
        _require_keys(path, cat, ("id", "name"), f"category entry {k} of 'categories'")
        categories.append(
            {"id": _int(path, f"category entry {k} of 'categories'", "id", cat["id"]), "name": str(cat["name"])}
        )
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: duplicate category ids in {sorted(ids)}")
    return sorted(categories, key=lambda c: c["id"])


def _parse_images(path: Path, data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    if not isinstance(data["images"], list):
        raise DatasetError(f"{path}: 'images' must be a list")
    images: dict[int, dict[str, Any]] = {}
    for k, img in enumerate(data["images"]):
        name = f"image entry {k} of 'images'"
        _require_keys(path, img, ("id", "file_name", "width", "height"), name)
        image_id = _int(path, name, "id", img["id"])
        name = f"image id {image_id} '{img['file_name']}' (entry {k} of 'images')"
        if image_id in images:
            raise DatasetError(f"{path}: {name}: duplicate image id {image_id}")
        images[image_id] = {
            "index": k,
            "file_name": str(img["file_name"]),
            "width": _int(path, name, "width", img["width"]),
            "height": _int(path, name, "height", img["height"]),
            "anns": [],
        }
    return images


def _annotation_name(j: int, ann: Any) -> str:
    """How messages name annotation j: by its own id, and its position in the file's 'annotations' list."""
    if isinstance(ann, dict) and "id" in ann:
        return f"annotation id {ann['id']!r} (entry {j} of 'annotations')"
    return f"annotation entry {j} of 'annotations'"


def _parse_annotation(
    path: Path, j: int, ann: Any, images: dict[int, Any], cat_to_label: dict[int, int]
) -> tuple[int | None, str | None]:
    """Attach annotation j to its image; return (image_id, problem) where problem makes the image bad."""
    name = _annotation_name(j, ann)
    _require_keys(path, ann, ("image_id", "category_id", "bbox"), name)
    image_id = _int(path, name, "image_id", ann["image_id"])
    if image_id not in images:
        return None, f"{path}: {name}: unknown image_id {image_id} (not in 'images')"
    img = images[image_id]
    where = f"{path}: {name}, of image id {image_id} '{img['file_name']}' (entry {img['index']} of 'images')"
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        return image_id, f"{where}: bbox {bbox!r}; expected [x, y, w, h] numbers"
    x, y, w, h = (float(v) for v in bbox)
    if not (math.isfinite(w) and math.isfinite(h)) or w <= 0 or h <= 0:
        return image_id, f"{where}: bbox [x, y, w, h] = {bbox}: expected w > 0 and h > 0"
    category_id = _int(path, name, "category_id", ann["category_id"])
    if category_id not in cat_to_label:
        return image_id, f"{where}: unknown category_id {category_id}; expected one of {sorted(cat_to_label)}"
    img["anns"].append((name, [x, y, w, h], cat_to_label[category_id], bool(ann.get("iscrowd", 0))))
    return image_id, None


def _make_record(path: Path, images_dir: Path, image_id: int, img: dict[str, Any]) -> ImageRecord:
    anns = img["anns"]
    return ImageRecord(
        path=images_dir / img["file_name"],
        image_id=image_id,
        boxes=xywh_to_xyxy(torch.tensor([a[1] for a in anns], dtype=torch.float64).reshape(-1, 4)).float(),
        labels=torch.tensor([a[2] for a in anns], dtype=torch.int64),
        iscrowd=torch.tensor([a[3] for a in anns], dtype=torch.bool),
        width=img["width"],
        height=img["height"],
        where=f"{path}: image id {image_id} '{img['file_name']}' (entry {img['index']} of 'images')",
        box_names=[a[0] for a in anns],
    )


def parse_coco(
    annotation_file: str | Path, images_dir: str | Path, skip_bad: bool = False
) -> tuple[list[dict[str, Any]], list[ImageRecord], list[Skip]]:
    """Read a COCO instances JSON -> (categories sorted by id, records in the file's image order, what skip_bad left
    out).

    A structural problem (missing file, invalid JSON, missing keys) always raises DatasetError; a bad annotation
    raises too, or with skip_bad is dropped alone (said in one line); so is a box outside the size the file states
    for its image. The image files themselves are checked by `DetectionDataset.check_images`.
    """
    path = Path(annotation_file)
    data = read_json(path)
    _require_keys(path, data, ("images", "annotations", "categories"), "top level")
    categories = _parse_categories(path, data)
    cat_to_label = {c["id"]: label for label, c in enumerate(categories)}
    images = _parse_images(path, data)
    if not isinstance(data["annotations"], list):
        raise DatasetError(f"{path}: 'annotations' must be a list")
    problems: list[Skip] = []
    for j, ann in enumerate(data["annotations"]):
        image_id, problem = _parse_annotation(path, j, ann, images, cat_to_label)
        if problem is not None:
            known = images.get(image_id)
            problems.append(
                Skip(
                    str(Path(images_dir) / known["file_name"]) if known else str(path),
                    known["index"] if known else None,
                    problem,
                    box=known is not None,
                )
            )
    records = []
    for image_id, img in images.items():  # boxes against the sizes the file states (the files' own: check_images)
        record = _make_record(path, Path(images_dir), image_id, img)
        bad = box_problems(record.boxes, record.width, record.height, record.where, record.box_names)
        problems += [Skip(str(record.path), img["index"], why, box=True) for _, why in bad]
        records.append(without_boxes(record, [j for j, _ in bad], record.width, record.height))
    return categories, records, report_bad(problems, skip_bad)


class CocoDetection(DetectionDataset):
    """A COCO-format dataset: images in `images_dir`, annotations in a COCO instances JSON.

    images_dir: folder that the JSON's "file_name"s are relative to.
    annotation_file: COCO instances JSON ({"images", "annotations", "categories"}); bbox is [x, y, w, h] pixels.
    transforms: (image, target) -> (image, target), e.g. `train_transforms(...)`.
    skip_bad: drop bad annotations and unreadable images (one line each, kept in `skipped`) instead of raising.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        transforms: Transforms | None = None,
        skip_bad: bool = False,
    ) -> None:
        categories, records, skipped = parse_coco(annotation_file, images_dir, skip_bad)
        super().__init__(categories, records, transforms=transforms, skip_bad=skip_bad, skipped=skipped)
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)


def to_coco_dict(dataset: DetectionDataset) -> dict[str, Any]:
    """The dataset's annotations as a COCO instances dict (boxes_xywh, original category ids, iscrowd).

    Images whose size the format does not state (CSV) are opened to read it. The "file_name" is the image's
    file name, or "<image_id:012d>.png" for generated images (what `write_coco` writes).
    """
    label_to_id = dataset.label_to_category_id
    images, annotations = [], []
    for index, record in enumerate(dataset.records):
        width, height = record.width, record.height
        if width is None or height is None:
            width, height = dataset.load_image(index).size
        name = record.path.name if record.path is not None else f"{record.image_id:012d}.png"
        images.append({"id": record.image_id, "file_name": name, "width": width, "height": height})
        xywh = xyxy_to_xywh(record.boxes.double()).tolist()
        for (x, y, w, h), label, crowd in zip(xywh, record.labels.tolist(), record.iscrowd.tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCO ids start at 1; pycocotools treats id 0 as missing
                    "image_id": record.image_id,
                    "category_id": label_to_id[label],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": int(c["id"]), "name": c["name"]} for c in dataset.categories]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(dataset: DetectionDataset, folder: str | Path, json_name: str = "annotations.json") -> tuple[Path, Path]:
    """Save every image as PNG in folder/images and the annotations as folder/<json_name>.

    Returns (images_dir, annotation_file), the arguments of `CocoDetection`, which reads the same records back.
    Images are named "<image_id:012d>.png" (PNG: lossless, so pixels round-trip exactly).
    """
    folder = Path(folder)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    coco = to_coco_dict(dataset)
    for index, entry in enumerate(coco["images"]):
        entry["file_name"] = f"{entry['id']:012d}.png"
        dataset.load_image(index).save(images_dir / entry["file_name"])
    return images_dir, atomic_write(folder / json_name, json.dumps(coco))
