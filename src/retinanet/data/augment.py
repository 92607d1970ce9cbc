"""Training augmentation as configuration: named presets and per-operation settings (DataConfig), built from
torchvision's transforms v2 where they exist.

    flip       the paper's: horizontal flips only (the default)
    top_down   small objects seen from above (aerial, satellite, microscopy): horizontal and vertical flips, rotations
               by multiples of 90 degrees, brightness / contrast / saturation jitter, scale jitter, random crops
               and mosaics
    none       nothing but the resize

Each operation (`Augmentation`) has its own DataConfig key, which replaces the preset's value when set. Boxes stay
consistent with the pixels through every operation: flips and rotations move them, a crop clips them and drops those
of which less than `min_visible` of their area stays inside, a mosaic does the same for each of its four parts.
Random draws come from torch's generator, which DataLoader seeds per worker, so that a run is a function of its seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from retinanet.config import DataConfig

__all__ = [
    "PRESETS",
    "Augmentation",
    "ColorMatrixJitter",
    "Mosaic",
    "RandomCropBoxes",
    "RandomRotate90",
    "augmentation_of",
    "augmentation_transforms",
    "color_matrix",
]


@dataclass(frozen=True)
class Augmentation:
    """What training does to an image besides the resize. Probabilities are per image.

    hflip, vflip: flip probabilities. rotate90: probability of a rotation by 90, 180 or 270 degrees (drawn alike).
    brightness, contrast, saturation, hue: ColorJitter strengths (0: off). scale_jitter: the training size is
    multiplied by a factor drawn uniformly from this range. crop: probability of a random crop whose sides are a
    share drawn from crop_scale of the image's. min_visible: a box cut by a crop or a mosaic is kept (clipped) when
    at least this share of its area stays inside. mosaic: probability that an image is replaced by a mosaic of it
    and three others, each cut to one of four parts around a random centre.
    """

    hflip: float = 0.5
    vflip: float = 0.0
    rotate90: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    scale_jitter: tuple[float, float] = (1.0, 1.0)
    crop: float = 0.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    min_visible: float = 0.5
    mosaic: float = 0.0

    def problems(self) -> list[str]:
        out = [
            f"{name} = {getattr(self, name)} must be in [0, 1]"
            for name in (
                "hflip",
                "vflip",
                "rotate90",
                "crop",
                "min_visible",
                "mosaic",
                "brightness",
                "contrast",
                "saturation",
            )
            if not 0 <= getattr(self, name) <= 1
        ]
        if not 0 <= self.hue <= 0.5:
            out.append(f"hue = {self.hue} must be in [0, 0.5]")
        low, high = self.scale_jitter
        if not 0 < low <= high:
            out.append(f"scale_jitter = {list(self.scale_jitter)} must be [low, high] with 0 < low <= high")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            out.append(f"crop_scale = {list(self.crop_scale)} must be [low, high] with 0 < low <= high <= 1")
        return out

    def describe(self) -> str:
        """The operations that are on, in one line."""
        on = [
            f"{f.name} {getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) not in (0, 0.0, (1.0, 1.0)) and f.name not in ("crop_scale", "min_visible")
        ]
        return ", ".join(on) or "none"


PRESETS: dict[str, Augmentation] = {
    "flip": Augmentation(),
    "none": Augmentation(hflip=0.0),
    # hue jitter off, as before it was cheap (data.hue turns it on: one colour matrix, about a millisecond a tile)
    "top_down": Augmentation(
        hflip=0.5,
        vflip=0.5,
        rotate90=0.75,
        brightness=0.25,
        contrast=0.25,
        saturation=0.25,
        scale_jitter=(0.8, 1.25),
        crop=0.5,
        crop_scale=(0.5, 1.0),
        mosaic=0.5,
    ),
}


# DataConfig key -> Augmentation field
_KEYS = {
    "flip_prob": "hflip",
    "vflip_prob": "vflip",
    "rotate90_prob": "rotate90",
    "brightness": "brightness",
    "contrast": "contrast",
    "saturation": "saturation",
    "hue": "hue",
    "scale_jitter": "scale_jitter",
    "crop_prob": "crop",
    "crop_scale": "crop_scale",
    "min_visible": "min_visible",
    "mosaic_prob": "mosaic",
}


def augmentation_of(data: DataConfig) -> Augmentation:
    """The augmentation a DataConfig asks for: its preset with the operations it sets on their own; a ValueError
    naming the key for a value out of range."""
    if data.augment not in PRESETS:
        raise ValueError(f"data config: augment = {data.augment!r} is not one of {sorted(PRESETS)}")
    given = {
        field: tuple(getattr(data, key)) if isinstance(getattr(data, key), (list, tuple)) else getattr(data, key)
        for key, field in _KEYS.items()
        if getattr(data, key) is not None
    }
    aug = dataclasses.replace(PRESETS[data.augment], **given)
    problems = aug.problems()
    if problems:
        names = {v: k for k, v in _KEYS.items()}
        field = problems[0].split(" ")[0]
        raise ValueError(f"data config: {problems[0].replace(field, names.get(field, field), 1)}")
    return aug


# ------------------------------------------------------------------------------------------------------------------
def augmentation_transforms(aug: Augmentation) -> tuple[list[Callable], list[Callable]]:
    """The per-image operations: (before the resize: photometric jitter, flips, rotations; after it: the random
    crop, at the training scale)."""
    ops: list[Callable] = []
    if any((aug.brightness, aug.contrast, aug.saturation, aug.hue)):
        ops.append(ColorMatrixJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip:
        ops.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rotate90:
        ops.append(RandomRotate90(aug.rotate90))
    crop = [RandomCropBoxes(aug.crop, aug.crop_scale, aug.min_visible)] if aug.crop else []
    return ops, crop


_LUMA = (0.299, 0.587, 0.114)  # the grey of saturation and contrast (ITU-R 601-2, as torchvision's)


def color_matrix(brightness: float, contrast: float, saturation: float, hue: float) -> Tensor:
    """[3, 3] float32 M such that brightness, then contrast (around the image's mean grey g), saturation and a hue
    rotation are y = contrast * brightness * M x + (1 - contrast) * brightness * g: the factors as ColorJitter
    draws them (1 = unchanged; hue in turns, 0 = unchanged). The hue turns colours about the grey axis (R = G = B)
    of RGB space, which keeps every grey: the linear form of a hue shift, in place of an HSV round trip."""
    luma = torch.tensor(_LUMA)
    sat = saturation * torch.eye(3) + (1.0 - saturation) * torch.ones(3, 1) * luma  # s x + (1 - s) grey(x)
    theta = 2.0 * torch.pi * torch.tensor(hue)
    u = torch.full((3,), 3.0**-0.5)
    cross = torch.tensor([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    rotation = torch.cos(theta) * torch.eye(3) + torch.sin(theta) * cross + (1 - torch.cos(theta)) * torch.outer(u, u)
    return rotation @ sat


class ColorMatrixJitter(v2.Transform):
    """Brightness, contrast, saturation and hue jitter as one 3 x 3 colour matrix per image: strengths and draws
    as torchvision's ColorJitter (each factor uniform in [1 - s, 1 + s], hue in [-h, h] of a turn), applied in one
    pass over the pixels and clamped once. torchvision's hue jitter converts to HSV and back (about 40 ms for a
    400 px image on one core); this costs about a millisecond, so that hue jitter is affordable on a CPU (measured by
    benchmarks/bench_augment.py). Boxes are unchanged. uint8 images stay uint8 (rounded), float ones float."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        super().__init__()
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def factor(strength: float) -> float:
            return float(torch.empty(()).uniform_(1 - strength, 1 + strength)) if strength else 1.0

        b, c, s = factor(self.brightness), factor(self.contrast), factor(self.saturation)
        h = float(torch.empty(()).uniform_(-self.hue, self.hue)) if self.hue else 0.0
        return {"brightness": b, "contrast": c, "matrix": color_matrix(b, c, s, h)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        x = inpt.as_subclass(Tensor)
        top = 255.0 if x.dtype == torch.uint8 else 1.0
        pixels = x.reshape(3, -1).float()
        b, c = params["brightness"], params["contrast"]
        grey = torch.tensor(_LUMA) @ pixels.mean(dim=1)  # the image's mean grey
        out = torch.addmm(torch.full((3, 1), (1 - c) * b * float(grey)), c * b * params["matrix"], pixels)
        out = out.clamp_(0.0, top).reshape(x.shape)
        return tv_tensors.wrap(out.round_().to(x.dtype) if x.dtype == torch.uint8 else out.to(x.dtype), like=inpt)

    _get_params = make_params  # torchvision < 0.21 calls these names
    _transform = transform


class RandomRotate90(v2.Transform):
    """With probability p, a rotation by 90, 180 or 270 degrees (counter-clockwise), image and boxes alike: exact,
    no interpolation, the canvas turned with it."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        apply = bool(torch.rand(()) < self.p)
        return {"angle": 90 * int(torch.randint(1, 4, ())) if apply else 0}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["angle"] == 0:
            return inpt
        return self._call_kernel(F.rotate, inpt, angle=params["angle"], expand=True)

    _get_params = make_params  # torchvision < 0.21 calls these names
    _transform = transform


class RandomCropBoxes:
    """With probability p, a crop whose height and width are each a share drawn from `scale` of the image's, at a
    random place; boxes are clipped to it and those with less than min_visible of their area inside are dropped
    (labels and iscrowd with them). Takes and returns (image, target)."""

    def __init__(self, p: float, scale: tuple[float, float] = (0.5, 1.0), min_visible: float = 0.5) -> None:
        self.p, self.scale, self.min_visible = p, scale, min_visible

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        if not bool(torch.rand(()) < self.p):
            return image, target
        height, width = image.shape[-2:]
        low, high = self.scale
        h = max(1, round(height * float(torch.empty(()).uniform_(low, high))))
        w = max(1, round(width * float(torch.empty(()).uniform_(low, high))))
        top, left = int(torch.randint(height - h + 1, ())), int(torch.randint(width - w + 1, ()))
        return crop_with_boxes(image, target, top, left, h, w, self.min_visible)


def crop_with_boxes(
    image: Tensor, target: dict[str, Any], top: int, left: int, height: int, width: int, min_visible: float
) -> tuple[Tensor, dict[str, Any]]:
    """The window (top, left, height, width) of the image and its target: boxes translated and clipped, those with
    less than min_visible of their area inside dropped together with their labels and iscrowd."""
    boxes = target["boxes"]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cropped = F.clamp_bounding_boxes(F.crop(boxes, top, left, height, width))
    inside = (cropped[:, 2] - cropped[:, 0]) * (cropped[:, 3] - cropped[:, 1])
    keep = (inside >= min_visible * area) & (inside > 0)
    out = {**target, "boxes": tv_tensors.wrap(cropped[keep], like=cropped)}
    for key in ("labels", "iscrowd"):
        if key in target:
            out[key] = target[key][keep]
    return F.crop(image, top, left, height, width), out


class Mosaic:
    """Four images in one (YOLO's mosaic): a canvas of the first image's size split at a random centre (each side
    cut between a quarter and three quarters), each part filled with a window of one image at its own scale, at a
    random place in it (zero-padded where the image is smaller); boxes as `crop_with_boxes` gives them.

    images: four uint8 [3, H, W]; targets: their targets. Returns (image, target) with the first's image_id and
    orig_size (the mosaic is the first image's training sample)."""

    def __init__(self, min_visible: float = 0.5) -> None:
        self.min_visible = min_visible

    def __call__(self, images: list[Tensor], targets: list[dict[str, Any]]) -> tuple[Tensor, dict[str, Any]]:
        height, width = images[0].shape[-2:]
        cy = int(height * float(torch.empty(()).uniform_(0.25, 0.75)))
        cx = int(width * float(torch.empty(()).uniform_(0.25, 0.75)))
        parts = [(0, 0, cy, cx), (0, cx, cy, width - cx), (cy, 0, height - cy, cx), (cy, cx, height - cy, width - cx)]
        canvas = images[0].new_zeros((images[0].shape[0], height, width))
        boxes, labels, crowd = [], [], []
        for image, target, (y, x, h, w) in zip(images, targets, parts):
            top = int(torch.randint(max(image.shape[-2] - h, 0) + 1, ()))
            left = int(torch.randint(max(image.shape[-1] - w, 0) + 1, ()))
            piece, t = crop_with_boxes(
                image,
                target,
                top,
                left,
                min(h, image.shape[-2] - top),
                min(w, image.shape[-1] - left),
                self.min_visible,
            )
            canvas[:, y : y + piece.shape[-2], x : x + piece.shape[-1]] = piece
            boxes.append(t["boxes"].as_subclass(Tensor) + torch.tensor([x, y, x, y], dtype=t["boxes"].dtype))
            labels.append(t["labels"])
            crowd.append(t["iscrowd"])
        out = {
            **targets[0],
            "labels": torch.cat(labels),
            "iscrowd": torch.cat(crowd),
            "boxes": tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY", canvas_size=(height, width)),
        }
        return tv_tensors.Image(canvas), out
