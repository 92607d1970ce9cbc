"""Pascal VOC in: JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/<split>.txt.

VOC boxes are 1-based and inclusive: a box covering pixel columns 0..9 (0-based) is written xmin=1, xmax=10. In
the continuous XYXY pixel-edge coordinates used everywhere else that is x1 = xmin - 1 = 0, x2 = xmax = 10, so the
conversion here is (xmin - 1, ymin - 1, xmax, ymax). The same holds for detectron2 and the VOC devkit.

`difficult` objects are kept with iscrowd=True: like COCO crowds, they are ignored in training (neither
positive nor negative) and in evaluation (VOC's metric neither rewards nor penalises detections of them).
Category ids are 1..K in the order of `class_names`; image_id is the image's position in the split file.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import torch

from retinanet.data.base import DatasetError, DetectionDataset, ImageRecord, Skip, Transforms, box_problems, report_bad
from retinanet.ops.boxes import clip_boxes

__all__ = ["VOC_CLASSES", "VocDetection", "parse_voc_xml"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def read_image_set(root: Path, split: str | Path) -> tuple[Path, list[str]]:
    """The image ids listed in ImageSets/Main/<split>.txt (or in the file `split` when it is a path)."""
    path = Path(split)
    if path.suffix != ".txt":
        path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DatasetError(f"{path}: image set file not found (expected one image id per line)")
    ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: empty image set file; expected one image id per line")
    return path, ids


def _number(node: ET.Element, tag: str, xml_path: Path, what: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DatasetError(f"{xml_path}: {what}: <{tag}> is {text!r}; expected a number") from None


def _parse_object(
    obj: ET.Element, k: int, xml_path: Path, name_to_label: dict[str, int]
) -> tuple[list[float], int, bool]:
    """One <object> -> (box XYXY 0-based edges, label, difficult)."""
    what = f"object {k}"
    name = (obj.findtext("name") or "").strip()
    if name not in name_to_label:
        raise DatasetError(f"{xml_path}: {what}: unknown class {name!r}; expected one of {sorted(name_to_label)}")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise DatasetError(f"{xml_path}: {what} ({name}): no <bndbox>")
    xmin, ymin, xmax, ymax = (_number(bndbox, t, xml_path, what) for t in ("xmin", "ymin", "xmax", "ymax"))
    difficult = (obj.findtext("difficult") or "0").strip() == "1"
    return [xmin - 1.0, ymin - 1.0, xmax, ymax], name_to_label[name], difficult


def parse_voc_xml(
    xml_path: Path,
    image_path: Path,
    image_id: int,
    where: str,
    name_to_label: dict[str, int],
    problems: list[Skip] | None = None,
) -> ImageRecord:
    """Read one VOC annotation file into a checked ImageRecord; raises DatasetError naming the file and object, or,
    given `problems`, leaves a bad object out and adds it there (its image keeps its other objects)."""
    if not xml_path.is_file():
        raise DatasetError(f"{where}: annotation file not found: {xml_path}")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{xml_path}: malformed XML: {e}") from e
    size = root.find("size")
    width = int(_number(size, "width", xml_path, "<size>")) if size is not None else None
    height = int(_number(size, "height", xml_path, "<size>")) if size is not None else None
    parsed, names, bad = [], [], []
    for k, obj in enumerate(root.findall("object")):
        try:
            parsed.append(_parse_object(obj, k, xml_path, name_to_label))
            names.append(f"object {k}")
        except DatasetError as e:
            bad.append(str(e))
    boxes = torch.tensor([p[0] for p in parsed], dtype=torch.float32).reshape(-1, 4)
    wrong = box_problems(boxes, width, height, f"{xml_path}: {where}", names)
    bad += [why for _, why in wrong]
    if bad and problems is None:
        raise DatasetError(bad[0])
    problems = problems if problems is not None else []
    problems += [Skip(str(image_path), image_id, why, box=True) for why in bad]
    keep = [j for j in range(len(parsed)) if j not in {j for j, _ in wrong}]
    record = ImageRecord(
        path=image_path,
        image_id=image_id,
        boxes=boxes[keep].reshape(-1, 4),
        labels=torch.tensor([parsed[j][1] for j in keep], dtype=torch.int64),
        iscrowd=torch.tensor([parsed[j][2] for j in keep], dtype=torch.bool),
        width=width,
        height=height,
        where=f"{xml_path}: {where}",
        box_names=[names[j] for j in keep],
    )
    if width is not None and height is not None:
        record.boxes = clip_boxes(record.boxes, (height, width))
    return record


class VocDetection(DetectionDataset):
    """A Pascal VOC-layout dataset.

    root: the folder holding JPEGImages/, Annotations/ and ImageSets/Main/ (e.g. VOCdevkit/VOC2007).
    split: a split name ("train", "val", "trainval", "test") read from ImageSets/Main/<split>.txt, or the path of
        an image set file (ending in .txt).
    class_names: the classes, in label order; VOC's 20 by default. An object of another class is an error.
    transforms: (image, target) -> (image, target). skip_bad: drop bad objects and unreadable images (one line
        each, kept in `skipped`) instead of raising.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | Path = "trainval",
        class_names: Sequence[str] = VOC_CLASSES,
        transforms: Transforms | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        self.image_set_file, ids = read_image_set(self.root, split)
        name_to_label = {name: label for label, name in enumerate(class_names)}
        records, problems = [], []
        for index, name in enumerate(ids):
            where = f"image {index} ('{name}' in {self.image_set_file.name})"
            image = self.root / "JPEGImages" / f"{name}.jpg"
            try:
                records.append(
                    parse_voc_xml(
                        self.root / "Annotations" / f"{name}.xml", image, index, where, name_to_label, problems
                    )
                )
            except DatasetError as e:  # the annotation file itself: its image is lost
                problems.append(Skip(str(image), index, str(e)))
        skipped = report_bad(problems, skip_bad)
        categories = [{"id": label + 1, "name": name} for label, name in enumerate(class_names)]
        super().__init__(categories, records, transforms=transforms, skip_bad=skip_bad, skipped=skipped)
