"""The dataset base class, its per-image record, and the checks every format shares.

Every format (COCO, VOC, CSV, synthetic) parses its annotations into `ImageRecord`s when it is constructed, and
`check_images` then reads every image's header (no decoding), so that a bad annotation, a box outside its image or
an unreadable or truncated file surfaces before anything is written, rather than hours into training. With
skip_bad, a bad box is dropped alone and an unreadable image with its boxes, each said in one line and kept in the
dataset's `skipped` list.

Boxes are float [N, 4] XYXY in absolute pixels, x in [0, width], y in [0, height], x2 > x1, y2 > y1; a box may
stick out of the image by up to `BOX_TOLERANCE_PX` (annotation tools round outwards) and is then clipped.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from retinanet.data.augment import Mosaic
from retinanet.ops.boxes import OUTSIDE_TOLERANCE_PX, clip_boxes

__all__ = ["BOX_TOLERANCE_PX", "DatasetError", "DetectionDataset", "ImageRecord", "Target", "check_boxes", "report_bad"]

BOX_TOLERANCE_PX = OUTSIDE_TOLERANCE_PX

# (image, target) -> (image, target); a torchvision.transforms.v2 transform or anything with that signature
Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[tv_tensors.Image, dict[str, Any]]]
Target = dict[str, Any]


class DatasetError(ValueError):
    """A problem with a dataset's files; the message names the file, the index and what was expected."""


@dataclass
class ImageRecord:
    """One image's annotations, parsed and checked.

    path:      the image file (None for generated images).
    image_id:  int, unique within the dataset (COCO's id; the position in the split for VOC and CSV).
    boxes:     [N, 4] float32 XYXY absolute pixels, clipped to the image.
    labels:    [N] int64 contiguous labels 0..K-1.
    iscrowd:   [N] bool; crowd (COCO) or difficult (VOC) objects, ignored in training and evaluation.
    width, height: the image size the annotations state, or None where the format gives none (CSV).
    where:     how error messages name the image, e.g. "train.json: image 12 ('a.jpg')".
    box_names: how error messages name each box, e.g. "annotation 40" or "line 7"; len N.
    """

    path: Path | None
    image_id: int
    boxes: Tensor
    labels: Tensor
    iscrowd: Tensor
    width: int | None
    height: int | None
    where: str
    box_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        assert self.boxes.shape == (n, 4) and self.boxes.dtype == torch.float32, self.boxes.shape
        assert self.labels.shape == (n,) and self.labels.dtype == torch.int64
        assert self.iscrowd.shape == (n,) and self.iscrowd.dtype == torch.bool
        assert len(self.box_names) == n


def check_boxes(
    boxes: Tensor, width: int | None, height: int | None, where: str, box_names: Sequence[str]
) -> str | None:
    """The first problem with `boxes` as an error message, or None when every box is valid.

    boxes: [N, 4] float XYXY absolute pixels. width, height: the image size, or None to skip the bounds check.
    A box is valid when it is finite, x2 > x1, y2 > y1, and it lies inside the image give or take
    BOX_TOLERANCE_PX.
    """
    for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        name = f"{where}, {box_names[j]}"
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            return f"{name}: box {[x1, y1, x2, y2]} is not finite"
        if x2 <= x1:
            return f"{name}: x2 ({x2}) <= x1 ({x1}); expected XYXY with x2 > x1"
        if y2 <= y1:
            return f"{name}: y2 ({y2}) <= y1 ({y1}); expected XYXY with y2 > y1"
        if width is None or height is None:
            continue
        t = BOX_TOLERANCE_PX
        if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
            return (
                f"{name}: box {[x1, y1, x2, y2]} lies outside the {width}x{height} image "
                f"(expected 0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= {height}, +-{t:g} px)"
            )
    return None


def box_problems(
    boxes: Tensor, width: int | None, height: int | None, where: str, box_names: Sequence[str]
) -> list[tuple[int, str]]:
    """(index, message) of every invalid box (see `check_boxes`)."""
    out = []
    for j in range(len(boxes)):
        problem = check_boxes(boxes[j : j + 1], width, height, where, box_names[j : j + 1])
        if problem is not None:
            out.append((j, problem))
    return out


def without_boxes(record: ImageRecord, dropped: Sequence[int], width: int, height: int) -> ImageRecord:
    """The record with the boxes `dropped` left out, the rest clipped to the image, and its size known."""
    keep = torch.ones(len(record.boxes), dtype=torch.bool)
    keep[list(dropped)] = False
    return dataclasses.replace(
        record,
        boxes=clip_boxes(record.boxes[keep], (height, width)),
        labels=record.labels[keep],
        iscrowd=record.iscrowd[keep],
        width=width,
        height=height,
        box_names=[n for n, k in zip(record.box_names, keep.tolist()) if k],
    )


class Skip(NamedTuple):
    """What skip_bad left out: the file it concerns (an image, or an annotation file), the dataset index of its image
    (None where the image never became one), and why; `box` when one box (not the whole image) was dropped."""

    file: str
    index: int | None
    reason: str
    box: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "index": self.index,
            "reason": self.reason,
            "dropped": "box" if self.box else "image",
        }


def notice(line: str) -> None:
    """One line for the user on standard error (not a Python warning: no source line, no repeat filter)."""
    print(f"retinanet: {line}", file=sys.stderr, flush=True)


def report_bad(problems: Sequence[Skip], skip_bad: bool) -> list[Skip]:
    """Raise DatasetError on the first problem, or with skip_bad say each in one line and return them."""
    if not problems:
        return []
    if not skip_bad:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DatasetError(problems[0].reason + more)
    for p in problems:
        line = f"skipped {'a box' if p.box else 'an image'}: {p.reason}"
        if line not in _SAID:  # a file read twice (the same annotations for training and validation) is said once
            _SAID.add(line)
            notice(line)
    return list(problems)


_SAID: set[str] = set()  # the skip lines this process has said


def image_header(path: Path, where: str) -> tuple[int, int]:
    """(width, height) of an image file from its header, with the file checked to be whole (a PNG ends in its IEND
    chunk, a JPEG in its end-of-image marker) without decoding the pixels; DatasetError naming the file otherwise."""
    if not path.is_file():
        raise DatasetError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
        with path.open("rb") as f:
            f.seek(max(path.stat().st_size - 1024, 0))
            tail = f.read()
    except Image.DecompressionBombError:
        raise DatasetError(
            f"{where}: image {path} is past Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} "
            "megapixels (a guard against decompression bombs): cut it into tiles to train on it "
            "(`retinanet detect --tile N --allow-large-images` detects in it whole)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{where}: cannot read image {path}: {e}") from e
    if (fmt == "PNG" and b"IEND" not in tail[-64:]) or (fmt == "JPEG" and b"\xff\xd9" not in tail):
        raise DatasetError(f"{where}: image {path} is truncated (the {fmt} file ends before its last marker)")
    return size


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of any PIL image mode. 16-bit, 32-bit and float images (I;16, I, F: microscopy, scientific
    cameras) are scaled by their own range, their darkest pixel to 0 and their brightest to 255 (PIL would clip them
    to 255); 1, L, LA, P, RGBA, CMYK and YCbCr as PIL converts them (an alpha channel is dropped)."""
    if image.mode.startswith(("I", "F")):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        grey = np.zeros(pixels.shape, np.uint8) if high <= low else ((pixels - low) * (255.0 / (high - low))).round()
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_rgb(path: Path, where: str) -> Image.Image:
    """Decode an image file to an RGB PIL image (any mode, `to_rgb`), or raise DatasetError naming the file and
    `where`."""
    if not path.is_file():
        raise DatasetError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            return Image.fromarray(to_rgb(im), "RGB")  # the full decode: truncation surfaces here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{where}: cannot decode image {path}: {e}") from e


class DetectionDataset(torch.utils.data.Dataset):
    """A detection dataset: `records` of annotations plus the images they describe.

    dataset[i] -> (image, target) after `transforms`:
        image:  tv_tensors.Image float32 [3, H, W] in [0, 1] (not mean/std normalised: the model does that).
        target: dict with
            "boxes":     tv_tensors.BoundingBoxes float32 [N, 4] XYXY, canvas_size (H, W)
            "labels":    int64 [N] contiguous labels 0..K-1
            "iscrowd":   bool [N] (crowd or difficult: ignored in training and evaluation)
            "image_id":  int
            "orig_size": (H0, W0) ints, the size of the image as stored, before transforms

    categories: the original ids and names, in the order of the contiguous labels: categories[label]["id"].
    mosaic, min_visible: training's mosaic (set by build_dataset from the DataConfig's augmentation).
    skipped: what skip_bad has left out so far (`Skip`s): the formats' annotation problems, then `check_images`'.
    skip_bad: drop bad boxes and unreadable images (one line each, kept in `skipped`) instead of raising; an image
        that stops decoding after the check is met in __getitem__, which then says so and returns the next good
        image (index i + 1, i + 2, ... wrapping around) so that a long run is not lost to one bad file.
    """

    def __init__(
        self,
        categories: list[dict[str, Any]],
        records: list[ImageRecord],
        transforms: Transforms | None = None,
        skip_bad: bool = False,
        skipped: Sequence[Skip] = (),
    ) -> None:
        self.categories = categories
        self.records = records
        self.transforms = transforms
        self.skip_bad = skip_bad
        # training's mosaic (retinanet.data.augment): the probability that an item is four images in one, and the
        # share of a cut box's area that keeps it
        self.mosaic, self.min_visible = 0.0, 0.5
        self.skipped: list[Skip] = list(skipped)  # what skip_bad left out, from the annotations on
        # cache_images: keep each decoded image in memory (uint8, H x W x 3 bytes each, per DataLoader worker), so
        # that epochs after the first decode nothing (set by build_dataset from DataConfig.cache_images)
        self.cache_images = False
        self._pixels: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (no background class)."""
        return len(self.categories)

    @property
    def category_names(self) -> list[str]:
        """Class names indexed by contiguous label."""
        return [c["name"] for c in self.categories]

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """Contiguous label 0..K-1 -> the original category id (e.g. for writing COCO results)."""
        return {label: int(c["id"]) for label, c in enumerate(self.categories)}

    @property
    def category_id_to_label(self) -> dict[int, int]:
        """Original category id -> contiguous label 0..K-1."""
        return {int(c["id"]): label for label, c in enumerate(self.categories)}

    def check_images(self) -> "DetectionDataset":
        """Check every image before training starts, from its file's header (no decoding): that it exists, is whole
        (`image_header`) and has the size its annotations state, and that every box lies in it and is not empty.
        The first problem raises DatasetError naming the file and the index; with skip_bad, an image that cannot be
        read is dropped and a bad box is dropped alone, each said in one line and kept in `skipped`."""
        problems, records = [], []
        for index, record in enumerate(self.records):
            if record.path is None:  # generated images: checked when drawn
                records.append(record)
                continue
            where = f"{record.where} (dataset index {index})"
            try:
                width, height = image_header(record.path, where)
                if record.width is not None and (record.width, record.height) != (width, height):
                    raise DatasetError(
                        f"{where}: the image is {width}x{height} but its annotation says {record.width}x{record.height}"
                    )
            except DatasetError as e:
                problems.append(Skip(str(record.path), index, str(e)))
                continue
            bad = box_problems(record.boxes, width, height, where, record.box_names)
            problems += [Skip(str(record.path), index, why, box=True) for _, why in bad]
            records.append(without_boxes(record, [j for j, _ in bad], width, height))
        self.skipped += report_bad(problems, self.skip_bad)
        if not records:
            raise DatasetError(f"none of the {len(self.records)} images of the dataset can be read")
        self.records = records
        return self

    def subset(self, count: int) -> "DetectionDataset":
        """A copy holding `count` records spread evenly over this one's (all, when it has fewer): a fixed sample,
        e.g. of the training images evaluated beside the validation set."""
        out = copy.copy(self)
        step = max(1, len(self.records) // max(count, 1))
        out.records = self.records[::step][:count]
        return out

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of record `index`; raises DatasetError if it is missing or does not decode."""
        record = self.records[index]
        assert record.path is not None, "a dataset without files must override load_image"
        return load_rgb(record.path, f"{record.where} (dataset index {index})")

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, Target]:
        if not self.skip_bad:
            return self._load(index)
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                return self._load(i)
            except DatasetError as e:  # met only now (the file changed since the check): the next image instead
                notice(f"skipped an image: {e}")
        raise DatasetError(f"no image of the {len(self)} in the dataset could be loaded")

    def _load(self, index: int) -> tuple[tv_tensors.Image, Target]:
        image, target = self._decoded(index)
        if self.mosaic and len(self) > 1 and bool(torch.rand(()) < self.mosaic):
            parts = [(image, target)] + [self._decoded(int(i)) for i in torch.randint(len(self), (3,))]
            image, target = Mosaic(self.min_visible)([p[0] for p in parts], [p[1] for p in parts])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if image.dtype == torch.uint8:
            image = tv_tensors.wrap(image.float().div_(255.0), like=image)
        return image, target

    def _decoded(self, index: int) -> tuple[tv_tensors.Image, Target]:
        """The image (uint8) and its target as stored, checked, before any transform."""
        record = self.records[index]
        cached = self._pixels.get(index) if self.cache_images else None
        pixels = cached.clone() if cached is not None else self._checked_pixels(index)
        height, width = pixels.shape[-2:]
        image = tv_tensors.Image(pixels)  # uint8 until after transforms: resizing uint8 is faster
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(
                clip_boxes(record.boxes, (height, width)), format="XYXY", canvas_size=(height, width)
            ),
            "labels": record.labels.clone(),
            "iscrowd": record.iscrowd.clone(),
            "image_id": record.image_id,
            "orig_size": (height, width),
        }
        return image, target

    def _checked_pixels(self, index: int) -> Tensor:
        """Record `index`'s image decoded (uint8 [3, H, W]) after checking its size and boxes against it (kept in
        memory when cache_images is on)."""
        record = self.records[index]
        pil = self.load_image(index)
        width, height = pil.size
        where = f"{record.where} (dataset index {index})"
        if record.width is not None and (record.width, record.height) != (width, height):
            raise DatasetError(
                f"{where}: the image is {width}x{height} but its annotation says {record.width}x{record.height}"
            )
        problem = check_boxes(record.boxes, width, height, where, record.box_names)
        if problem is not None:
            raise DatasetError(problem)
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)
        if self.cache_images:
            self._pixels[index] = pixels.clone()
        return pixels

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes: {self.category_names})"
