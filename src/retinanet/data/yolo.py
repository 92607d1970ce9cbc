"""YOLO txt in: the Ultralytics layout that Ultralytics, Roboflow and Label Studio export.

data.yaml names the classes and where the images are:

    path: .                 # the dataset's root (relative: against the yaml's folder; absent: the yaml's folder)
    train: images/train     # a folder of images (searched recursively), a .txt list of image paths, or a list
    val: images/val
    names: {0: tree, 1: car}   # or a list ['tree', 'car']; nc, where given, must agree

Each image's labels are in a .txt file at the image's path with its last `images` folder replaced by `labels` and
its suffix by .txt (images/train/a.jpg -> labels/train/a.txt; an image outside any images/ folder: a.txt beside it).
One object per line: `class cx cy w h`, the class its 0-based index in names and the box its centre and size as
fractions of the image's width and height. A line of more numbers is a polygon (`class x1 y1 x2 y2 ...`, Ultralytics'
segmentation labels) and stands for the box around it. An image without a label file, or with an empty one, is an
image with no objects (as Ultralytics reads it).

Category ids are the class indices (names[0] is category 0, as in Ultralytics' results); image_id is the image's
position in the split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torchvision.ops import box_convert

from retinanet.data.base import (
    DatasetError,
    DetectionDataset,
    ImageRecord,
    Skip,
    Transforms,
    box_problems,
    image_header,
    report_bad,
)
from retinanet.ops.boxes import clip_boxes

__all__ = ["IMAGE_SUFFIXES", "YoloDetection", "label_path", "read_data_yaml"]

IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"}  # Ultralytics' own
# the 0-1 fractions may overshoot a little where a tool rounded outwards (the box is then clipped to the image)
FRACTION_TOLERANCE = 0.01


def read_data_yaml(path: str | Path) -> dict[str, Any]:
    """data.yaml -> {"root": the dataset's folder, "names": [class names by index], and its split keys as read}; a
    DatasetError naming the file for a missing file, bad YAML, or names that are missing or disagree with nc."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: YOLO data.yaml not found (expected the file with 'names' and 'train'/'val')")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise DatasetError(f"{path}: expected a mapping with 'names' and 'train'/'val', got {type(spec).__name__}")
    names = spec.get("names")
    if isinstance(names, dict):
        try:
            indices = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: names {names!r}: keys must be the class indices 0, 1, ...") from None
        if indices != list(range(len(indices))):
            raise DatasetError(f"{path}: names: the class indices are {indices}; expected 0..{len(indices) - 1}")
        names = [names[k] if k in names else names[str(k)] for k in indices]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise DatasetError(
            f"{path}: 'names' must list the class names ({{0: tree, 1: car}} or [tree, car]), got {names!r}"
        )
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: names {names}: a class name appears twice")
    if "nc" in spec and spec["nc"] != len(names):
        raise DatasetError(f"{path}: nc = {spec['nc']!r} but names holds {len(names)} classes")
    root = Path(spec["path"]) if spec.get("path") else Path(".")
    root = root if root.is_absolute() else path.parent / root
    return {**spec, "root": root, "names": names}


def label_path(image: Path) -> Path:
    """The label file of `image`: its path with the last `images` folder replaced by `labels`, suffix .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def split_images(entry: Any, root: Path, where: str) -> list[Path]:
    """The image files of a split entry of data.yaml (a folder, searched recursively; a .txt list of image paths,
    relative ones against the dataset's root as Ultralytics reads them; or a list of either), in order, each once."""
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for item in entries:
        if not isinstance(item, str) or not item:
            raise DatasetError(f"{where}: {item!r}; expected a folder of images or a .txt list of image paths")
        path = Path(item) if Path(item).is_absolute() else root / item
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file() and path.suffix == ".txt":
            lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
            files += [Path(s) if Path(s).is_absolute() else root / s for s in lines if s and not s.startswith("#")]
        else:
            raise DatasetError(f"{where}: {path} is neither a folder of images nor a .txt list of image paths")
    unique = list(dict.fromkeys(files))
    if not unique:
        raise DatasetError(f"{where}: no images found in {entry!r} (looked for {sorted(IMAGE_SUFFIXES)})")
    return unique


def parse_label_file(path: Path, num_classes: int) -> tuple[list[tuple[int, list[float], str]], list[str]]:
    """The objects of one label file as (class index, [cx, cy, w, h] fractions, "line N"), and one message per line
    that cannot be read (its object alone is lost). A missing file holds no objects."""
    if not path.is_file():
        return [], []
    objects, bad = [], []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = text.split()
        if not fields:
            continue
        where = f"{path}: line {n}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            bad.append(f"{where}: {text.strip()!r}; expected 'class cx cy w h' (numbers)")
            continue
        if not values[0].is_integer() or not 0 <= values[0] < num_classes:
            bad.append(f"{where}: class {fields[0]} is not a class index 0..{num_classes - 1} of data.yaml's names")
            continue
        coords = values[1:]
        if len(coords) == 4:
            box = coords
        elif len(coords) >= 6 and len(coords) % 2 == 0:  # a polygon: the box around it
            xs, ys = coords[0::2], coords[1::2]
            box = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        else:
            bad.append(
                f"{where}: {len(fields)} numbers; expected 'class cx cy w h' or a polygon 'class x1 y1 x2 y2 ...'"
            )
            continue
        t = FRACTION_TOLERANCE
        if not all(-t <= v <= 1 + t for v in coords):
            bad.append(
                f"{where}: coordinates {coords} are not fractions of the image (0 to 1): YOLO labels are "
                "normalised by the image's width and height"
            )
            continue
        objects.append((int(values[0]), box, f"line {n}"))
    return objects, bad


class YoloDetection(DetectionDataset):
    """A dataset in the Ultralytics YOLO layout (see the module docstring).

    data_yaml: the data.yaml file. split: its key to read ("train", "val", "test"), or `images` to give the split's
        entry directly (a folder of images or a .txt list; relative: against the dataset's root).
    transforms: (image, target) -> (image, target). skip_bad: drop bad label lines and unreadable images (one line
        each, kept in `skipped`) instead of raising.
    """

    def __init__(
        self,
        data_yaml: str | Path,
        split: str = "train",
        images: str | None = None,
        transforms: Transforms | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.data_yaml = Path(data_yaml)
        spec = read_data_yaml(self.data_yaml)
        if images is None and not spec.get(split):
            keys = [k for k in ("train", "val", "test") if spec.get(k)]
            raise DatasetError(f"{self.data_yaml}: no '{split}' images named (the file names {keys or 'none'})")
        entry = images if images is not None else spec[split]
        files = split_images(entry, spec["root"], f"{self.data_yaml}: {split}")
        names = spec["names"]
        records, problems = [], []
        for index, image in enumerate(files):
            where = f"{self.data_yaml}: {split} image {index} ('{image.name}')"
            try:
                width, height = image_header(image, where)
            except DatasetError as e:
                problems.append(Skip(str(image), index, str(e)))
                continue
            records.append(self._record(image, index, where, width, height, len(names), problems))
        if not any(label_path(f).is_file() for f in files):
            first = label_path(files[0])
            raise DatasetError(
                f"{self.data_yaml}: {split}: none of the {len(files)} images has a label file (the "
                f"first's would be {first}): expected labels/ beside images/"
            )
        skipped = report_bad(problems, skip_bad)
        categories = [{"id": k, "name": name} for k, name in enumerate(names)]
        super().__init__(categories, records, transforms=transforms, skip_bad=skip_bad, skipped=skipped)

    @staticmethod
    def _record(
        image: Path, index: int, where: str, width: int, height: int, num_classes: int, problems: list[Skip]
    ) -> ImageRecord:
        labels_file = label_path(image)
        objects, bad = parse_label_file(labels_file, num_classes)
        fractions = torch.tensor([box for _, box, _ in objects], dtype=torch.float32).reshape(-1, 4)
        boxes = box_convert(fractions * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
        names = [name for _, _, name in objects]
        wrong = box_problems(boxes, width, height, f"{labels_file}: {where}", names)
        problems += [Skip(str(image), index, why, box=True) for why in bad + [why for _, why in wrong]]
        keep = [j for j in range(len(objects)) if j not in {j for j, _ in wrong}]
        return ImageRecord(
            path=image,
            image_id=index,
            boxes=clip_boxes(boxes[keep].reshape(-1, 4), (height, width)),
            labels=torch.tensor([objects[j][0] for j in keep], dtype=torch.int64),
            iscrowd=torch.zeros(len(keep), dtype=torch.bool),
            width=width,
            height=height,
            where=f"{labels_file}: {where}",
            box_names=[names[j] for j in keep],
        )
