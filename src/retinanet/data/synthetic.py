"""SyntheticShapes: a built-in detection dataset of textured shapes on cluttered backgrounds, made on the fly.

Each image is drawn from a layout that depends only on (seed, split, index), so any image can be made again
anywhere (in a worker, on another machine) without files; `write` saves the dataset as PNGs and a COCO JSON
that `CocoDetection` reads back.

What makes it a detection problem rather than a toy: objects from `min_size` px to `max_size_frac` of the image
side (log-uniform, so small objects are common), any rotation, solid / striped / noisy fills, some overlap,
~8% of images without objects, and backgrounds of colour gradients, noise, lines and smudges that are not
objects. What keeps it learnable: the shapes differ in outline, objects contrast with the background around them,
and overlap is capped so no object is mostly hidden.

A box is the tight box of the whole drawn shape (computed from its pixel mask), also where a later object covers
part of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from retinanet.data.base import DetectionDataset, ImageRecord, Transforms
from retinanet.data.coco import write_coco

__all__ = ["SHAPES", "DEFAULT_SHAPES", "SyntheticShapes"]

SHAPES: tuple[str, ...] = ("circle", "ellipse", "square", "triangle", "star", "cross")
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ellipse")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "noise")
_SPLITS = {"train": 0, "val": 1}  # part of the seed: train and val draw from disjoint random streams


@dataclass(frozen=True)
class _Object:
    """One object's layout: everything needed to draw it again, in pixels and radians."""

    label: int
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float
    colour: tuple[int, int, int]
    texture: str
    texture_seed: int


def _outline(shape: str, aspect: float, steps: int = 48) -> np.ndarray:
    """The shape's vertices [P, 2] in a unit disk, before rotation and scaling."""
    t = np.linspace(0.0, 2.0 * math.pi, steps, endpoint=False)
    if shape == "circle":
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "ellipse":
        return np.stack([np.cos(t), np.sin(t) / aspect], 1)
    if shape in ("square", "triangle"):
        n = 4 if shape == "square" else 3
        a = np.arange(n) * 2.0 * math.pi / n - math.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "star":
        a = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        w = 0.34  # arm half-width
        pts = [
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
            (-w, -1),
        ]
        return np.array(pts, dtype=np.float64)
    raise ValueError(f"synthetic.py: unknown shape {shape!r}; expected one of {SHAPES}")


def _shape_mask(obj: _Object) -> tuple[Image.Image, int, int]:
    """(mask "L" 255 inside the shape, x0, y0): the mask covers image pixels [x0, x0 + w) x [y0, y0 + h)."""
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    pts = _outline(obj.shape, obj.aspect) @ np.array([[c, s], [-s, c]]) * obj.radius + (obj.cx, obj.cy)
    x0, y0 = math.floor(pts[:, 0].min()) - 1, math.floor(pts[:, 1].min()) - 1
    w, h = math.ceil(pts[:, 0].max()) + 2 - x0, math.ceil(pts[:, 1].max()) + 2 - y0
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in pts.tolist()], fill=255)
    return mask, x0, y0


def _tight_box(obj: _Object, width: int, height: int) -> list[float]:
    """The object's box XYXY in pixel edges: [x1, x2) x [y1, y2) is the smallest span of its drawn pixels."""
    mask, x0, y0 = _shape_mask(obj)
    left, top, right, bottom = mask.getbbox()  # right and bottom are exclusive: pixel edges, as XYXY wants
    return [max(0, x0 + left), max(0, y0 + top), min(width, x0 + right), min(height, y0 + bottom)]


def _texture(obj: _Object, size: tuple[int, int]) -> Image.Image:
    """An RGB fill of `size` (w, h) for the object: solid, stripes of a darker shade, or noise."""
    w, h = size
    rgb = np.array(obj.colour, dtype=np.float32)
    rng = np.random.default_rng(obj.texture_seed)
    if obj.texture == "stripes":
        period, a = rng.uniform(4.0, 12.0), rng.uniform(0.0, math.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        on = ((xx * math.cos(a) + yy * math.sin(a)) // (period / 2) % 2).astype(bool)
        pixels = np.where(on[..., None], rgb * 0.55, rgb)
    elif obj.texture == "noise":
        pixels = rgb + rng.normal(0.0, 28.0, (h, w, 3))
    else:
        pixels = np.broadcast_to(rgb, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _contrasting_colour(rng: np.random.Generator, background: Sequence[np.ndarray]) -> tuple[int, int, int]:
    """A random colour at least 150 (L1 over RGB) from each background colour, so every object stands out."""
    for _ in range(100):
        colour = rng.integers(0, 256, 3)
        if all(np.abs(colour - b).sum() >= 150 for b in background):
            break
    return tuple(int(v) for v in colour)  # type: ignore[return-value]


class SyntheticShapes(DetectionDataset):
    """Generated images of shapes: deterministic by (seed, split, index), no download, no files.

    split: "train" or "val" (disjoint random streams for the same seed).
    num_images: dataset length. image_size: (H, W) of every image.
    shapes: the classes, in label order; category ids are 1..K with these names (any of SHAPES).
    min_size, max_size_frac: object extent from min_size px to max_size_frac * min(H, W), log-uniform.
    max_objects: objects per image are 1..max_objects (fewer where they do not fit); empty_frac of the images
        have none.
    clutter: strength of the background noise, lines and smudges and of the sensor noise; 0 gives plain
        gradients and exact object colours (as the tests use).
    textures: the fills to draw from (TEXTURES). max_overlap: the largest share of an object's extent that
        earlier objects may cover.
    transforms: (image, target) -> (image, target).
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 1000,
        image_size: tuple[int, int] = (256, 256),
        seed: int = 0,
        shapes: Sequence[str] = DEFAULT_SHAPES,
        min_size: int = 12,
        max_size_frac: float = 0.8,
        max_objects: int = 6,
        empty_frac: float = 0.08,
        clutter: float = 1.0,
        textures: Sequence[str] = TEXTURES,
        max_overlap: float = 0.3,
        transforms: Transforms | None = None,
        cache: bool = False,
    ) -> None:
        # cache: keep each drawn image in memory (uint8, 3 x H x W bytes each; per DataLoader worker), so that
        # epochs after the first cost no drawing
        self.cache, self._cache = cache, {}
        if split not in _SPLITS:
            raise ValueError(f"synthetic.py: split {split!r}; expected one of {list(_SPLITS)}")
        for name in shapes:
            _outline(name, 2.0)  # raises for an unknown shape
        if not set(textures) <= set(TEXTURES) or not textures:
            raise ValueError(f"synthetic.py: textures {textures}; expected a non-empty subset of {TEXTURES}")
        self.split, self.seed, self.image_size = split, seed, (int(image_size[0]), int(image_size[1]))
        self.shapes, self.textures = tuple(shapes), tuple(textures)
        self.min_size, self.max_size_frac, self.max_objects = min_size, max_size_frac, max_objects
        self.empty_frac, self.clutter, self.max_overlap = empty_frac, clutter, max_overlap
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.shapes)]
        records = [self._record(i) for i in range(num_images)]
        super().__init__(categories, records, transforms=transforms, skip_bad=False)

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        """Stream 0 lays the objects out, stream 1 draws the background: each can be made without the other."""
        return np.random.default_rng([self.seed, _SPLITS[self.split], index, stream])

    def _background_colours(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = self._rng(index, 1)
        start = rng.integers(0, 256, 3)
        return start, np.clip(start + rng.integers(-70, 71, 3), 0, 255)

    def _sample_object(self, rng: np.random.Generator, background: tuple[np.ndarray, np.ndarray]) -> _Object:
        height, width = self.image_size
        largest = max(self.min_size + 1.0, self.max_size_frac * min(height, width))
        extent = math.exp(rng.uniform(math.log(self.min_size), math.log(largest)))
        radius = extent / 2
        label = int(rng.integers(len(self.shapes)))
        return _Object(
            label=label,
            shape=self.shapes[label],
            cx=float(rng.uniform(radius + 1, width - radius - 1)),
            cy=float(rng.uniform(radius + 1, height - radius - 1)),
            radius=radius,
            angle=float(rng.uniform(0.0, 2.0 * math.pi)),
            aspect=float(rng.uniform(2.0, 3.0)),
            colour=_contrasting_colour(rng, background),
            texture=self.textures[int(rng.integers(len(self.textures)))],
            texture_seed=int(rng.integers(2**31)),
        )

    def _overlaps(self, obj: _Object, placed: list[_Object]) -> bool:
        """Whether obj and an earlier object share more than max_overlap of the smaller one's extent square."""
        for other in placed:
            dx = min(obj.cx + obj.radius, other.cx + other.radius) - max(obj.cx - obj.radius, other.cx - other.radius)
            dy = min(obj.cy + obj.radius, other.cy + other.radius) - max(obj.cy - obj.radius, other.cy - other.radius)
            smaller = 4 * min(obj.radius, other.radius) ** 2
            if dx > 0 and dy > 0 and dx * dy > self.max_overlap * smaller:
                return True
        return False

    def layout(self, index: int) -> list[_Object]:
        """The objects of image `index`, in drawing order (later ones on top)."""
        rng = self._rng(index, 0)
        if rng.random() < self.empty_frac:
            return []
        placed: list[_Object] = []
        background = self._background_colours(index)  # once per image: each object's colour contrasts with it
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            for _attempt in range(20):
                obj = self._sample_object(rng, background)
                if not self._overlaps(obj, placed):
                    placed.append(obj)
                    break
        return placed

    def _record(self, index: int) -> ImageRecord:
        height, width = self.image_size
        objects = self.layout(index)
        return ImageRecord(
            path=None,
            image_id=index,
            boxes=torch.tensor([_tight_box(o, width, height) for o in objects], dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor([o.label for o in objects], dtype=torch.int64),
            iscrowd=torch.zeros(len(objects), dtype=torch.bool),
            width=width,
            height=height,
            where=f"SyntheticShapes({self.split}, seed={self.seed}): image {index}",
            box_names=[f"object {k}" for k in range(len(objects))],
        )

    def _background(self, index: int) -> Image.Image:
        """A gradient between two colours along a random direction, plus noise, lines and blurred smudges."""
        height, width = self.image_size
        start, end = self._background_colours(index)
        rng = self._rng(index, 2)
        a = rng.uniform(0.0, 2.0 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xx * math.cos(a) + yy * math.sin(a)) / max(height, width) * 0.5 + 0.5
        pixels = start + (end - start) * t[..., None]
        pixels += rng.normal(0.0, 10.0 * self.clutter, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        self._draw_distractors(image, rng)
        return image

    def _draw_distractors(self, image: Image.Image, rng: np.random.Generator) -> None:
        """Lines and smudges (irregular, blurred, half transparent): texture that no box should fire on."""
        width, height = image.size
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(0, 1 + round(6 * self.clutter)))):
            xy = rng.uniform(0, 1, 4) * (width, height, width, height)
            draw.line(xy.tolist(), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
        for _ in range(int(rng.integers(0, 1 + round(3 * self.clutter)))):
            r = rng.uniform(6, max(8, min(width, height) / 5))
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            a = np.sort(rng.uniform(0, 2 * math.pi, 9))
            rr = r * rng.uniform(0.4, 1.0, 9)
            smudge = Image.new("L", image.size, 0)
            ImageDraw.Draw(smudge).polygon(
                list(zip((cx + rr * np.cos(a)).tolist(), (cy + rr * np.sin(a)).tolist())), fill=110
            )
            smudge = smudge.filter(ImageFilter.GaussianBlur(r / 3))
            image.paste(tuple(int(v) for v in rng.integers(0, 256, 3)), (0, 0), smudge)

    def load_image(self, index: int) -> Image.Image:
        """Draw the image of record `index` (or take it from the in-memory cache, when `cache` is on)."""
        image_id = self.records[index].image_id  # the drawn image's own number, also in a subset of the records
        if self.cache:
            if image_id not in self._cache:
                self._cache[image_id] = self._draw(image_id)
            return self._cache[image_id].copy()
        return self._draw(image_id)

    def _draw(self, index: int) -> Image.Image:
        """Draw image `index`: background, then each object's texture through its shape mask, then sensor noise."""
        image = self._background(index)
        for obj in self.layout(index):
            mask, x0, y0 = _shape_mask(obj)
            image.paste(_texture(obj, mask.size), (x0, y0), mask)
        if self.clutter > 0:
            rng = self._rng(index, 3)
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 4.0 * self.clutter, (*self.image_size, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        return image

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Save the images (PNG) and a COCO JSON in folder -> (images_dir, annotation_file) for CocoDetection."""
        return write_coco(self, folder)
