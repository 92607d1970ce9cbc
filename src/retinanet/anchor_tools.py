"""How well a model's anchors fit a dataset's boxes, and anchors fitted to them.

A training box is *covered* when training's own matcher (`match_anchors` with the model's fg_iou, bg_iou and
allow_low_quality_matches, on the anchors of the padded training-size image) gives it at least one anchor whose IoU
with it is >= fg_iou: a *positive* anchor. With allow_low_quality_matches a box whose best anchor is below fg_iou
still gets that anchor (*low-quality only*); a box can also get none (IoU 0 with every anchor, or its anchors taken
by boxes that overlap them more). A box the matcher leaves uncovered is the usual reason for "loss 0 / mAP 0".

Boxes are taken from the dataset's annotations, resized as training resizes them (each of model.training_sizes,
without the random flip), so that thousands of images take seconds: no pixel is decoded. Boxes touching the image
border (x1 = 0 or y1 = 0) are boxes like any other. As in training, boxes under 1 px after resizing are dropped
(and counted) and crowd regions are not targets.

`fit_anchors` searches anchor sizes (doubling per level, so the base size also chooses which level carries which
size), scales and aspect ratios for the largest coverage, with a closed form of each box's best IoU over the grid
(`best_iou_on_grid`: the anchor of each shape nearest the box's centre, per level) in place of the matcher; the
coverage before and after is then computed exactly with the matcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import yaml
from torch import Tensor

from retinanet.anchors import AnchorGenerator
from retinanet.boxes import clip_boxes
from retinanet.config import ModelConfig, apply_overrides
from retinanet.matching import match_anchors
from retinanet.resize import resized_size

__all__ = [
    "NONE",
    "LOW_QUALITY",
    "POSITIVE",
    "AnchorLayout",
    "BoxSet",
    "Coverage",
    "anchor_generator",
    "anchor_counts",
    "best_iou_on_grid",
    "box_status",
    "coverage",
    "coverage_lines",
    "fit_anchors",
    "grid_sizes",
    "paired_iou",
    "plot_coverage",
    "training_boxes",
    "write_report",
]

NONE, LOW_QUALITY, POSITIVE = 0, 1, 2  # a box's status: no anchor, low-quality matches only, a positive anchor
STATUS_NAMES = ("no anchor", "low-quality only", "positive")
NUM_LEVELS = 5  # P3..P7
SIZE_EDGES = (8, 16, 32, 64, 128, 256, 512)  # buckets of sqrt(w h) after resizing, px
RATIO_EDGES = tuple(2 ** (k + 0.5) for k in range(-3, 3))  # buckets of h / w around 1/8, 1/4, ..., 4, 8
RATIO_NAMES = ("h/w < 0.18", "h/w ~ 1/4", "h/w ~ 1/2", "h/w ~ 1", "h/w ~ 2", "h/w ~ 4", "h/w > 5.7")


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread inside: the tools run thousands of tiny tensor operations, for which OpenMP's threads
    only wait on each other (7x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------------------
# the anchor layout of a model config, and the maths of one image


def anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
    """The AnchorGenerator a model built from `cfg` uses (its sizes, ratios, strides, offset and rounding)."""
    sizes = cfg.anchor_sizes_per_level or tuple(tuple(s * k for k in cfg.anchor_scales) for s in cfg.anchor_sizes)
    return AnchorGenerator(
        sizes_per_level=sizes,
        aspect_ratios=cfg.aspect_ratios,
        strides=None if cfg.anchor_strides_from_image else (8, 16, 32, 64, 128),
        offset=cfg.anchor_offset,
        round_base=cfg.anchor_round_base,
    )


def grid_sizes(padded_hw: tuple[int, int], num_levels: int = NUM_LEVELS) -> list[tuple[int, int]]:
    """The (H, W) of the feature maps P3..P7 of a padded input: every stride-2 layer of the ResNet and of P6/P7
    (3x3 or 1x1, padding 1 or 0) maps n to ceil(n / 2), so level l has ceil(side / 2^l)."""
    return [(-(-padded_hw[0] // 2**level), -(-padded_hw[1] // 2**level)) for level in range(3, 3 + num_levels)]


def padded_size(size_hw: tuple[int, int], size_divisible: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of size_divisible: the batch the model pads one image into."""
    d = size_divisible
    return -(-size_hw[0] // d) * d, -(-size_hw[1] // d) * d


def paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of each pair of rows: boxes1, boxes2 [N, 4] float XYXY -> [N]. The same operations, in the same order, as
    torchvision.ops.box_iou, so a pair's IoU here equals its entry there bit for bit (thresholds agree)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area1 + area2 - inter)


def anchor_counts(matches: Tensor, anchors: Tensor, gt_boxes: Tensor, fg_iou: float) -> tuple[Tensor, Tensor]:
    """How many anchors the matcher gave each gt box: (at IoU >= fg_iou [G] int64, in all [G] int64).

    matches: [A] int64 from `match_anchors` (gt index >= 0, or negative); anchors: [A, 4]; gt_boxes: [G, 4] float
    XYXY. Gathers and a scatter-add, no host-device sync, so the training loss can count uncovered boxes freely."""
    gt = matches.clamp(min=0)
    assigned = matches >= 0
    if gt_boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=matches.device)
        return empty, empty
    dtype = torch.promote_types(anchors.dtype, gt_boxes.dtype)
    good = assigned & (paired_iou(gt_boxes.to(dtype)[gt], anchors.to(dtype)) >= fg_iou)
    zeros = torch.zeros(gt_boxes.shape[0], dtype=torch.int64, device=matches.device)
    return zeros.scatter_add(0, gt, good.long()), zeros.scatter_add(0, gt, assigned.long())


def _level_shapes(generator: AnchorGenerator) -> Tensor:
    """[L, A, 2] float64 (width, height) of each level's anchors, as generated (rounded where the generator is)."""
    per_level = generator.base_anchors_per_level
    return torch.stack([torch.stack((b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), 1) for b in per_level])


def _candidates(generator: AnchorGenerator, grids: list[tuple[int, int]], padded_hw: tuple[int, int],
                boxes: Tensor, best_iou: Tensor, bg_iou: float) -> Tensor:  # fmt: skip
    """Indices into the image's anchors (all levels, ascending) of those that can matter to the matcher: for some
    box, IoU >= min(bg_iou, the box's best IoU) may hold. Every other anchor has IoU < bg_iou with every box and is
    no box's best, so the matcher makes it background; on these alone it gives each the same result as on all.

    The test is a bound on the centre distance: IoU >= t needs an intersection I >= t (area_box + area_anchor) /
    (1 + t), hence an overlap of at least I / min(heights) along x, so |dx| <= (w_box + w_anchor) / 2 - that."""
    shapes = _level_shapes(generator)[None]  # [1, L, A, 2]
    num_types = shapes.shape[2]
    strides = torch.tensor(generator._strides(grids, padded_hw), dtype=torch.float64).flip(-1)[None, :, None]  # x, y
    sizes = torch.tensor(grids, dtype=torch.float64).flip(-1)[None, :, None]  # [1, L, 1, 2] (gw, gh)
    b = boxes.double()
    wh = (b[:, 2:] - b[:, :2])[:, None, None]  # [G, 1, 1, 2]
    centre = ((b[:, :2] + b[:, 2:]) / 2)[:, None, None]
    t = (torch.minimum(best_iou.double(), torch.tensor(bg_iou, dtype=torch.float64)) - 1e-4).clamp(min=0)
    inter = (t / (1 + t))[:, None, None] * (wh.prod(-1) + shapes.prod(-1))  # [G, L, A]
    across = torch.minimum(wh, shapes).flip(-1)  # the smaller height (for x) and width (for y)
    reach = (wh + shapes) / 2 - inter[..., None] / across + 1e-3  # [G, L, A, 2]; 1e-3 px keeps it a superset
    # per box, level and shape the rectangle of cells whose centre (i + offset) * stride is within reach
    lo = torch.ceil((centre - reach) / strides - generator.offset).clamp(min=0).long()
    hi = torch.minimum(torch.floor((centre + reach) / strides - generator.offset), sizes - 1).long()
    count = (hi - lo + 1).clamp(min=0)  # [G, L, A, 2]
    if not bool((count.prod(-1) > 0).any()):
        return torch.zeros(0, dtype=torch.int64)
    steps_x, steps_y = torch.arange(int(count[..., 0].max())), torch.arange(int(count[..., 1].max()))
    valid = (steps_y < count[..., 1, None])[..., :, None] & (steps_x < count[..., 0, None])[..., None, :]
    ix, iy = lo[..., 0, None] + steps_x, lo[..., 1, None] + steps_y  # [G, L, A, mx], [G, L, A, my]
    grid_w = sizes[..., 0, None, None].long()
    level_start = torch.tensor([0] + [h * w * num_types for h, w in grids[:-1]]).cumsum(0)[None, :, None, None, None]
    kind = torch.arange(num_types)[None, None, :, None, None]
    index = level_start + (iy[..., :, None] * grid_w + ix[..., None, :]) * num_types + kind  # [G, L, A, my, mx]
    return torch.unique(index[valid])


@dataclass
class ImageStatus:
    """One image's boxes as the matcher sees them: best_iou [G] (the highest IoU of each box with any anchor),
    positive [G] int64 (anchors at IoU >= fg_iou given to it), assigned [G] int64 (anchors given to it in all),
    status [G] int64 (POSITIVE, LOW_QUALITY or NONE); anchors [M, 4] and matches [M]: the anchors that can matter
    and their matches (every anchor not listed is background)."""

    best_iou: Tensor
    positive: Tensor
    assigned: Tensor
    status: Tensor
    anchors: Tensor
    matches: Tensor


def box_status(cfg: ModelConfig, boxes: Tensor, padded_hw: tuple[int, int],
               generator: AnchorGenerator | None = None, best_iou: Tensor | None = None) -> ImageStatus:  # fmt: skip
    """What training's matcher does with the boxes of one image.

    boxes: [G, 4] float XYXY in the resized image's pixels (crowd regions left out: they are never targets and do
    not change which boxes get anchors). padded_hw: the padded input's (H, W), whose anchors are the model's.
    generator, best_iou: `anchor_generator(cfg)` and the boxes' `best_ious`, when the caller has them."""
    generator = generator or anchor_generator(cfg)
    grids = grid_sizes(padded_hw, generator.num_levels)
    boxes = boxes.float().reshape(-1, 4)
    best = best_iou if best_iou is not None else best_ious(boxes, padded_hw, generator)
    all_anchors = generator(grids, padded_hw, dtype=torch.float32)
    anchors = all_anchors[_candidates(generator, grids, padded_hw, boxes, best, cfg.bg_iou)]
    matches = match_anchors(anchors, boxes, cfg.fg_iou, cfg.bg_iou, cfg.allow_low_quality_matches)
    positive, assigned = anchor_counts(matches, anchors, boxes, cfg.fg_iou)
    status = torch.where(positive > 0, POSITIVE, torch.where(assigned > 0, LOW_QUALITY, NONE))
    return ImageStatus(best, positive, assigned, status, anchors, matches)


def best_ious(boxes: Tensor, padded_hw: tuple[int, int], generator: AnchorGenerator) -> Tensor:
    """[G] float32: each box's highest IoU with the anchors of a padded input (closed form, `best_iou_on_grid`).
    boxes: [G, 4] float XYXY; several images of one padded size may be given at once."""
    return best_iou_on_grid(GridOffsets.of_image(boxes, padded_hw, generator), _level_shapes(generator)).float()


# ------------------------------------------------------------------------------------------------------------------
# the boxes of a dataset as training sees them


@dataclass
class BoxSet:
    """A dataset's boxes after the training resize: one entry per (image, training size).

    boxes_per_entry: [G, 4] float32 XYXY in the resized image; padded_sizes: the padded input's (H, W) per entry;
    image_index: the dataset index per entry; dropped: boxes under 1 px after resizing (training drops them);
    crowd: crowd regions left out; images: images read.
    """

    boxes_per_entry: list[Tensor]
    padded_sizes: list[tuple[int, int]]
    image_index: list[int]
    dropped: int = 0
    crowd: int = 0
    images: int = 0

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self.boxes_per_entry)

    def all_boxes(self) -> Tensor:
        """[N, 4] every entry's boxes, concatenated."""
        return torch.cat(self.boxes_per_entry) if self.boxes_per_entry else torch.zeros(0, 4)


def _image_size(record: Any) -> tuple[int, int]:
    """(height, width) of a record: from its annotations, else from the image file's header (no decoding)."""
    if record.width is not None and record.height is not None:
        return int(record.height), int(record.width)
    from PIL import Image

    try:
        with Image.open(record.path) as im:
            return im.height, im.width
    except (OSError, ValueError) as exc:
        raise ValueError(f"{record.where}: cannot read the size of {record.path} ({exc})") from None


def resize_boxes(boxes: Tensor, size_hw: tuple[int, int], resized_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Boxes of an image of size_hw as the training transform gives them at resized_hw: clipped, scaled per axis,
    and those under 1 px dropped. Returns (boxes [G', 4] float32, kept [G] bool)."""
    (h0, w0), (h, w) = size_hw, resized_hw
    scale = torch.tensor([w / w0, h / h0, w / w0, h / h0], dtype=torch.float32)
    boxes = clip_boxes(boxes.float(), size_hw) * scale
    kept = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    return boxes[kept], kept


def training_boxes(records: Sequence[Any], cfg: ModelConfig, sizes: Iterable[int] | None = None,
                   one_size_each: bool = False) -> BoxSet:  # fmt: skip
    """The boxes of a dataset's records (`DetectionDataset.records`) resized to each training size (default
    model.training_sizes), with the padded size the model would give each image. one_size_each: image i at size
    i mod len(sizes) only, an estimate of multi-scale training's coverage at the cost of one size."""
    sizes = tuple(sizes) if sizes is not None else cfg.training_sizes
    out = BoxSet([], [], [], images=len(records))
    for index, record in enumerate(records):
        size_hw = _image_size(record)
        crowd = record.iscrowd.bool()
        out.crowd += int(crowd.sum())
        for min_size in (sizes[index % len(sizes)],) if one_size_each else sizes:
            resized = resized_size(size_hw[0], size_hw[1], min_size, cfg.max_size)
            boxes, kept = resize_boxes(record.boxes[~crowd], size_hw, resized)
            out.dropped += int((~kept).sum())
            out.boxes_per_entry.append(boxes)
            out.padded_sizes.append(padded_size(resized, cfg.size_divisible))
            out.image_index.append(index)
    return out


# ------------------------------------------------------------------------------------------------------------------
# coverage


@dataclass
class Coverage:
    """Per box (one per image and training size): best_iou [N], status [N] (POSITIVE, LOW_QUALITY, NONE),
    wh [N, 2] (width, height after resizing); and how many boxes were left out (dropped, crowd)."""

    best_iou: Tensor
    status: Tensor
    wh: Tensor
    images: int
    dropped: int
    crowd: int
    fg_iou: float

    @property
    def num_boxes(self) -> int:
        return int(self.status.numel())

    @property
    def value(self) -> float | None:
        """The share of boxes with a positive anchor (0..1), None without boxes."""
        return int((self.status == POSITIVE).sum()) / self.num_boxes if self.num_boxes else None

    def shares(self, mask: Tensor | None = None) -> dict[str, Any]:
        """{"boxes", "coverage", "low_quality_only", "no_anchor"} of all boxes or those of `mask`."""
        status = self.status if mask is None else self.status[mask]
        n = int(status.numel())
        share = {k: (float((status == s).sum()) / n if n else None)
                 for k, s in (("coverage", POSITIVE), ("low_quality_only", LOW_QUALITY), ("no_anchor", NONE))}
        return {"boxes": n, **share}  # fmt: skip

    def buckets(self) -> dict[str, list[dict[str, Any]]]:
        """Shares by size (sqrt of the area after resizing) and by aspect ratio h / w; empty buckets left out."""
        side = (self.wh[:, 0] * self.wh[:, 1]).sqrt()
        ratio = self.wh[:, 1] / self.wh[:, 0]
        size_names = [f"< {SIZE_EDGES[0]} px"] + [f"{a}-{b} px" for a, b in zip(SIZE_EDGES, SIZE_EDGES[1:])]
        size_names.append(f">= {SIZE_EDGES[-1]} px")
        by_size = torch.bucketize(side, torch.tensor(SIZE_EDGES, dtype=side.dtype), right=True)
        by_ratio = torch.bucketize(ratio, torch.tensor(RATIO_EDGES, dtype=ratio.dtype), right=True)
        return {
            "by_size": [{"bucket": n, **self.shares(by_size == i)} for i, n in enumerate(size_names)
                        if bool((by_size == i).any())],
            "by_aspect_ratio": [{"bucket": n, **self.shares(by_ratio == i)} for i, n in enumerate(RATIO_NAMES)
                                if bool((by_ratio == i).any())],
        }  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the shares overall and by bucket, the best IoUs' quantiles, what was left out."""
        q = (torch.quantile(self.best_iou.double(), torch.tensor([0.05, 0.25, 0.5], dtype=torch.float64)).tolist()
             if self.num_boxes else [None] * 3)  # fmt: skip
        return {
            **self.shares(), "fg_iou": self.fg_iou, "images": self.images,
            "best_iou": {"mean": float(self.best_iou.mean()) if self.num_boxes else None, "p5": q[0], "p25": q[1],
                         "median": q[2]},
            "dropped_under_1px": self.dropped, "crowd_ignored": self.crowd, **self.buckets(),
        }  # fmt: skip

    def describe(self) -> str:
        """One line: the coverage and what the other boxes get."""
        if not self.num_boxes:
            return "anchors: the training set has no boxes"
        s = self.shares()
        dropped = f"; {self.dropped} boxes under 1 px after resizing are dropped by training" if self.dropped else ""
        return (f"anchors: {100 * s['coverage']:.1f}% of the {self.num_boxes} training boxes have an anchor at IoU "
                f">= {self.fg_iou:g} ({100 * s['low_quality_only']:.1f}% only low-quality matches, "
                f"{100 * s['no_anchor']:.1f}% none){dropped}")  # fmt: skip


def coverage_lines(found: Coverage, least: float = 0.95) -> list[str]:
    """The training log's lines: the coverage, and below `least` a warning that names the tool that fixes it."""
    lines = [found.describe()]
    if found.value is not None and found.value < least:
        lines.append(f"warning: {100 * (1 - found.value):.1f}% of the training boxes have no anchor at IoU >= "
                     f"{found.fg_iou:g} (training learns a box from such anchors); `retinanet anchors --config "
                     "RUN.yaml --output DIR --fit` shows which and proposes anchors that fit the data")  # fmt: skip
    return lines


@_one_thread()
def coverage(box_set: BoxSet, cfg: ModelConfig) -> Coverage:
    """Training's matcher on every entry of `box_set` with the anchors of `cfg` (see the module docstring)."""
    generator = anchor_generator(cfg)
    best = _best_ious_per_entry(box_set, generator)
    status = [box_status(cfg, boxes, padded, generator, b).status
              for boxes, padded, b in zip(box_set.boxes_per_entry, box_set.padded_sizes, best) if len(boxes)]
    boxes = box_set.all_boxes()
    return Coverage(
        best_iou=torch.cat(best) if best else torch.zeros(0),
        status=torch.cat(status) if status else torch.zeros(0, dtype=torch.int64),
        wh=boxes[:, 2:] - boxes[:, :2], images=box_set.images, dropped=box_set.dropped, crowd=box_set.crowd,
        fg_iou=cfg.fg_iou,
    )  # fmt: skip


def _best_ious_per_entry(box_set: BoxSet, generator: AnchorGenerator) -> list[Tensor]:
    """`best_ious` of every entry, computed once per padded size for all its entries together."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, padded in enumerate(box_set.padded_sizes):
        by_size.setdefault(padded, []).append(i)
    out: list[Tensor] = [torch.zeros(0)] * len(box_set.padded_sizes)
    for padded, entries in by_size.items():
        parts = [box_set.boxes_per_entry[i] for i in entries]
        for i, best in zip(entries, best_ious(torch.cat(parts), padded, generator).split([len(p) for p in parts])):
            out[i] = best
    return out


# ------------------------------------------------------------------------------------------------------------------
# fitting


@dataclass(frozen=True)
class AnchorLayout:
    """Anchor shapes: per-level base sizes (px) times scales, at each aspect ratio h / w; A = scales x ratios."""

    anchor_sizes: tuple[float, ...]
    anchor_scales: tuple[float, ...]
    aspect_ratios: tuple[float, ...]

    @classmethod
    def of(cls, cfg: ModelConfig) -> "AnchorLayout":
        return cls(tuple(cfg.anchor_sizes), tuple(cfg.anchor_scales), tuple(cfg.aspect_ratios))

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_scales) * len(self.aspect_ratios)

    def sizes_per_level(self) -> list[list[float]]:
        return [[s * k for k in self.anchor_scales] for s in self.anchor_sizes]

    def overrides(self, cfg: ModelConfig) -> dict[str, Any]:
        """The model config keys that give this layout (rounded), from `cfg`."""
        out: dict[str, Any] = {
            "anchor_sizes": [round(s, 2) for s in self.anchor_sizes],
            "anchor_scales": [round(s, 4) for s in self.anchor_scales],
            "aspect_ratios": [round(r, 4) for r in self.aspect_ratios],
        }
        if cfg.anchor_sizes_per_level is not None:
            out["anchor_sizes_per_level"] = None  # it would override sizes x scales
        return out

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        return apply_overrides(cfg, self.overrides(cfg), "fitted anchors")


def _shapes(sizes_per_level: Sequence[Sequence[float]], ratios: Sequence[float]) -> Tensor:
    """[L, A, 2] anchor (width, height) per level, ratio-major then size, as AnchorGenerator orders them."""
    sizes = torch.tensor(sizes_per_level, dtype=torch.float64)  # [L, S]
    h_ratio = torch.tensor(ratios, dtype=torch.float64).sqrt()  # [R]
    ws = (sizes[:, None, :] / h_ratio[None, :, None]).reshape(len(sizes), -1)
    hs = (sizes[:, None, :] * h_ratio[None, :, None]).reshape(len(sizes), -1)
    return torch.stack((ws, hs), -1)


@dataclass
class GridOffsets:
    """Per box (one per image and training size): wh [N, 2] its width and height, and per level d [N, L, 2] the
    x and y distance from its centre to the nearest anchor centre of the level's grid (inside the grid)."""

    wh: Tensor
    d: Tensor

    @classmethod
    def of_image(cls, boxes: Tensor, padded_hw: tuple[int, int], generator: AnchorGenerator) -> "GridOffsets":
        """The offsets of one image's boxes [G, 4] on the grids of its padded input."""
        grids = grid_sizes(padded_hw, generator.num_levels)
        strides = torch.tensor(generator._strides(grids, padded_hw), dtype=torch.float64)  # [L, 2] (y, x)
        b = boxes.double()
        centre = torch.stack(((b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2), 1)  # [G, 2] (y, x)
        index = (centre[:, None] / strides - generator.offset).round().clamp(min=0)
        index = torch.minimum(index, torch.tensor(grids, dtype=torch.float64) - 1)
        nearest = (index + generator.offset) * strides
        return cls(b[:, 2:] - b[:, :2], (nearest - centre[:, None]).abs().flip(-1))  # d as (x, y)

    @classmethod
    def of(cls, box_set: BoxSet, generator: AnchorGenerator) -> "GridOffsets":
        """The offsets of every box of `box_set`."""
        parts = [cls.of_image(b, p, generator) for b, p in zip(box_set.boxes_per_entry, box_set.padded_sizes)
                 if len(b)]  # fmt: skip
        if not parts:
            return cls(torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, generator.num_levels, 2))
        return cls(torch.cat([p.wh for p in parts]), torch.cat([p.d for p in parts]))

    def subset(self, count: int, seed: int = 0) -> "GridOffsets":
        """At most `count` of the boxes, drawn at random (reproducibly), in float32 (enough for a search)."""
        pick = torch.randperm(len(self.wh), generator=torch.Generator().manual_seed(seed))[:count]
        return GridOffsets(self.wh[pick].float(), self.d[pick].float())


def best_iou_on_grid(offsets: GridOffsets, shapes: Tensor, reduce: bool = True) -> Tensor:
    """[N] (in the offsets' dtype) each box's highest IoU with any anchor, in closed form: per level and shape the
    anchor centred nearest the box's centre (on each axis IoU only falls as the centres part).

    shapes: [L, A, 2] anchor (width, height) per level (`_shapes`, or `_level_shapes` of a generator).
    reduce=False: the IoU per level and shape, [N, L, A], instead of the maximum."""
    if not len(offsets.wh):
        return offsets.wh.new_zeros(0)
    shapes = shapes.to(offsets.wh.dtype)
    half_box = offsets.wh[:, None, None, :] / 2  # [N, 1, 1, 2]
    half_anchor = shapes[None] / 2  # [1, L, A, 2]
    d = offsets.d[:, :, None, :]  # [N, L, 1, 2]
    # the box spans [-half_box, half_box] on each axis, the anchor [d - half_anchor, d + half_anchor]
    overlap = (torch.minimum(half_box, d + half_anchor) + torch.minimum(half_box, half_anchor - d)).clamp_(min=0)
    inter = overlap[..., 0] * overlap[..., 1]
    union = (offsets.wh.prod(1)[:, None, None] + shapes.prod(-1)[None]) - inter
    iou = inter / union
    return iou.flatten(1).amax(1) if reduce else iou


class _Search:
    """Coordinate descent over one structure (S scales, R ratios) of anchors, in log2 parameters
    [base size, scales 2..S (the first is 1), ratios]. Each box's best IoU per anchor type is kept as a column of an
    [N, R * S] table (ratio-major, as the generator orders them), so that a step that moves one scale or one ratio
    recomputes only the columns it changes."""

    STEPS = (0.25, 0.125, 0.0625)  # octaves

    def __init__(self, offsets: GridOffsets, fg_iou: float, num_scales: int, num_ratios: int, num_levels: int):
        self.offsets, self.fg_iou = offsets, fg_iou
        self.num_scales, self.num_ratios = num_scales, num_ratios
        self.pattern = torch.tensor([2.0**level for level in range(num_levels)], dtype=torch.float64)
        # bounds: base size 2..1024 px, further scales up to two octaves above the first, ratios 1/16..16
        self.low = torch.tensor([1.0] + [0.0] * (num_scales - 1) + [-4.0] * num_ratios, dtype=torch.float64)
        self.high = torch.tensor([10.0] + [2.0] * (num_scales - 1) + [4.0] * num_ratios, dtype=torch.float64)

    def layout(self, params: Tensor) -> AnchorLayout:
        base = 2 ** float(params[0])
        scales = (1.0, *(2 ** float(p) for p in params[1 : self.num_scales]))
        ratios = tuple(2 ** float(p) for p in params[self.num_scales :])
        return AnchorLayout(tuple(base * float(p) for p in self.pattern), tuple(sorted(scales)), tuple(sorted(ratios)))

    def columns(self, params: Tensor, which: Sequence[int]) -> Tensor:
        """[N, len(which)] each box's best IoU with the anchor types `which` (index r * S + s) over all levels."""
        scales = torch.cat((torch.zeros(1, dtype=torch.float64), params[1 : self.num_scales])).exp2()
        ratios = params[self.num_scales :].exp2()
        r = torch.tensor([w // self.num_scales for w in which])
        k = torch.tensor([w % self.num_scales for w in which])
        sizes = params[0].exp2() * self.pattern[:, None] * scales[k][None]  # [L, len(which)]
        shapes = torch.stack((sizes / ratios[r].sqrt(), sizes * ratios[r].sqrt()), -1)
        iou = best_iou_on_grid(self.offsets, shapes, reduce=False)  # [N, L, len(which)]
        return iou.amax(1)

    def score(self, table: Tensor) -> tuple[int, float]:
        """(boxes whose best IoU reaches fg_iou, the mean best IoU): compared as pairs, the second breaks ties."""
        best = table.amax(1)
        return int((best >= self.fg_iou).sum()), float(best.mean())

    def changed(self, j: int) -> list[int]:
        """The anchor types parameter j moves: all for the base size, one per ratio for a scale, S for a ratio."""
        s, num = self.num_scales, self.num_scales * self.num_ratios
        if j == 0:
            return list(range(num))
        if j < s:
            return [r * s + j for r in range(self.num_ratios)]
        return [(j - s) * s + k for k in range(s)]

    def start(self) -> Tensor:
        """Scales spread evenly over an octave, ratios at quantiles of the boxes' log2(h / w), the base size the
        best of a scan from 4 to 128 px in quarter octaves."""
        log_ratio = (self.offsets.wh[:, 1] / self.offsets.wh[:, 0]).log2().double()
        qs = torch.tensor([(i + 0.5) / self.num_ratios for i in range(self.num_ratios)], dtype=torch.float64)
        rest = torch.cat((torch.arange(1, self.num_scales, dtype=torch.float64) / self.num_scales,
                          torch.quantile(log_ratio, qs).clamp(-4, 4)))  # fmt: skip
        every = list(range(self.num_scales * self.num_ratios))
        starts = [torch.cat((torch.tensor([b], dtype=torch.float64), rest)) for b in torch.arange(2.0, 7.01, 0.25)]
        return max(starts, key=lambda p: self.score(self.columns(p, every)))

    def descend(self, params: Tensor) -> tuple[tuple[int, float], Tensor]:
        """Coordinate descent from `params` in steps of STEPS octaves: (its score, the parameters reached)."""
        table = self.columns(params, range(self.num_scales * self.num_ratios))
        best = self.score(table)
        for step in self.STEPS:
            for _ in range(4):  # passes over the coordinates at this step, while one improves
                improved = False
                for j in range(len(params)):
                    cols = self.changed(j)
                    for sign in (1.0, -1.0):
                        trial = params.clone()
                        trial[j] = (trial[j] + sign * step).clamp(self.low[j], self.high[j])
                        candidate = table.clone()
                        candidate[:, cols] = self.columns(trial, cols)
                        score = self.score(candidate)
                        if score > best:
                            best, params, table, improved = score, trial, candidate, True
                if not improved:
                    break
        return best, params

    def params_of(self, layout: AnchorLayout) -> Tensor:
        """The parameters of a layout whose sizes follow the pattern (its smallest scale folded into the base)."""
        low = min(layout.anchor_scales)
        scales = [math.log2(k / low) for k in sorted(layout.anchor_scales)[1:]]
        ratios = [math.log2(r) for r in layout.aspect_ratios]
        return torch.tensor([math.log2(layout.anchor_sizes[0] * low), *scales, *ratios], dtype=torch.float64)


@dataclass
class Fit:
    """The search's result: the chosen layout, the best found for every (scales, ratios) tried, with its proxy
    coverage (share of the boxes searched over whose closed-form best IoU reaches fg_iou)."""

    layout: AnchorLayout
    tried: list[dict[str, Any]]


@_one_thread()
def fit_anchors(box_set: BoxSet, cfg: ModelConfig, max_anchors: int = 9, tolerance: float = 0.005,
                max_boxes: int = 5000, seed: int = 0) -> Fit:  # fmt: skip
    """Anchor sizes (doubling per level), scales and aspect ratios that give the most boxes an anchor at
    IoU >= fg_iou, by the closed form `best_iou_on_grid` over up to `max_boxes` boxes.

    Every number of scales 1..4 and ratios 1..5 with scales x ratios <= max_anchors is searched (coordinate descent
    in log2 from a scan of base sizes, quantiles of the boxes' aspect ratios and scales spread over an octave), and
    the current layout too; the layout kept is the one with the fewest anchors per location whose coverage is
    within `tolerance` of the best (the head's cost grows with A)."""
    generator = anchor_generator(cfg)
    offsets = GridOffsets.of(box_set, generator).subset(max_boxes, seed)
    n = len(offsets.wh)
    if n == 0:
        raise ValueError("anchors --fit: the training set has no boxes to fit anchors to")
    tried = []
    structures = [(s, r) for s in range(1, 5) for r in range(1, 6) if s * r <= max_anchors]
    for num_scales, num_ratios in structures:
        search = _Search(offsets, cfg.fg_iou, num_scales, num_ratios, generator.num_levels)
        score, params = search.descend(search.start())
        tried.append((score, search.layout(params)))
    current = AnchorLayout.of(cfg)
    pattern = [cfg.anchor_sizes[0] * 2**level for level in range(generator.num_levels)]
    doubling = cfg.anchor_sizes_per_level is None and all(map(math.isclose, cfg.anchor_sizes, pattern))
    if doubling and current.num_anchors <= max_anchors:  # a search from the current layout too
        search = _Search(offsets, cfg.fg_iou, len(current.anchor_scales), len(current.aspect_ratios),
                         generator.num_levels)  # fmt: skip
        score, params = search.descend(search.params_of(current))
        tried.append((score, search.layout(params)))
    most = max(score[0] for score, _ in tried)
    good = [(score, layout) for score, layout in tried if score[0] >= most - tolerance * n]
    _, chosen = min(good, key=lambda t: (t[1].num_anchors, -t[0][0], -t[0][1]))
    rows = [{"num_anchors": layout.num_anchors, "proxy_coverage": score[0] / n, **dataclasses.asdict(layout)}
            for score, layout in tried]  # fmt: skip
    return Fit(chosen, rows)


# ------------------------------------------------------------------------------------------------------------------
# the report of `retinanet anchors`


def layout_summary(cfg: ModelConfig) -> dict[str, Any]:
    """The anchors of a config, JSON-ready: sizes per level (P3 first), aspect ratios, A per location."""
    generator = anchor_generator(cfg)
    return {"sizes_per_level": [[round(s, 2) for s in sizes] for sizes in generator.sizes_per_level],
            "aspect_ratios": list(generator.aspect_ratios),
            "anchors_per_location": generator.num_anchors_per_location()}


def write_report(records: Sequence[Any], cfg: ModelConfig, output: str | Path, fit: bool = False,
                 max_anchors: int = 9) -> dict[str, Any]:  # fmt: skip
    """Coverage of the dataset's boxes by the anchors of `cfg` (and, with `fit`, by fitted anchors), written to
    output/anchors.json, output/anchors.png and, with `fit`, output/anchors_fit.yaml (the model overrides).
    Returns the summary written to anchors.json: coverage, shares by bucket, best IoUs; fitted_coverage,
    overrides, fitted (the breakdown with them) and search (every layout tried) with `fit`."""
    tic = time.perf_counter()
    out = Path(output)
    box_set = training_boxes(records, cfg)
    found = coverage(box_set, cfg)
    summary = {**found.summary(), "training_sizes": list(cfg.training_sizes), "anchors": layout_summary(cfg)}
    generators = {"current": anchor_generator(cfg)}
    if fit:
        result = fit_anchors(box_set, cfg, max_anchors=max_anchors)
        fitted_cfg = result.layout.apply(cfg)
        fitted = coverage(box_set, fitted_cfg)
        overrides = result.layout.overrides(cfg)
        summary.update(fitted_coverage=fitted.value, overrides=overrides, fitted=fitted.summary(),
                       fitted_anchors=layout_summary(fitted_cfg), search=result.tried)  # fmt: skip
        generators["fitted"] = anchor_generator(fitted_cfg)
        out.mkdir(parents=True, exist_ok=True)
        header = (f"# retinanet anchors --fit: {_percent(found.value)} -> {_percent(fitted.value)} of the "
                  f"{found.num_boxes} training boxes get an anchor at IoU >= {cfg.fg_iou:g}\n")  # fmt: skip
        before, after = anchor_generator(cfg).num_anchors_per_location(), result.layout.num_anchors
        if before != after:
            header += (f"# anchors per location {before} -> {after}: a model started (model.init_from) from one with "
                       f"{before} starts its final layers again\n")  # fmt: skip
        text = yaml.safe_dump({"model": overrides}, sort_keys=False, default_flow_style=None)
        (out / "anchors_fit.yaml").write_text(header + text)
    summary["seconds"] = round(time.perf_counter() - tic, 2)
    if found.num_boxes:
        plot_coverage(found, generators, out / "anchors.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / "anchors.json").write_text(json.dumps(summary, indent=1))
    return summary


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# ------------------------------------------------------------------------------------------------------------------
# the picture


COLOURS = {POSITIVE: "#2ca02c", LOW_QUALITY: "#ff7f0e", NONE: "#d62728"}


def plot_coverage(found: Coverage, layouts: dict[str, AnchorGenerator], path: str | Path,
                  max_points: int = 20000) -> Path:  # fmt: skip
    """A PNG: the boxes' widths and heights (log-log, coloured by status) with each layout's anchor shapes over
    them, and the coverage by size bucket."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.5))
    ax_shapes, ax_sizes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    _plot_shapes(ax_shapes, found, layouts, max_points)
    _plot_size_buckets(ax_sizes, found)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _plot_shapes(ax: Any, found: Coverage, layouts: dict[str, AnchorGenerator], max_points: int) -> None:
    wh, status = found.wh, found.status
    if len(wh) > max_points:  # a sample keeps the picture legible and quick
        pick = torch.randperm(len(wh), generator=torch.Generator().manual_seed(0))[:max_points]
        wh, status = wh[pick], status[pick]
    for s in (POSITIVE, LOW_QUALITY, NONE):
        m = status == s
        if bool(m.any()):
            ax.scatter(wh[m, 0], wh[m, 1], s=4, alpha=0.4, c=COLOURS[s], label=f"box: {STATUS_NAMES[s]}")
    for (name, generator), marker, colour in zip(layouts.items(), ("x", "+"), ("black", "#1f77b4")):
        shapes = _shapes(generator.sizes_per_level, generator.aspect_ratios).reshape(-1, 2)
        ax.scatter(shapes[:, 0], shapes[:, 1], s=60, marker=marker, c=colour, label=f"anchor: {name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("box width after resizing (px)")
    ax.set_ylabel("box height after resizing (px)")
    ax.set_title(f"{found.num_boxes} boxes, coverage {100 * (found.value or 0):.1f}% (IoU >= {found.fg_iou:g})")
    ax.legend(fontsize=8, markerscale=2)


def _plot_size_buckets(ax: Any, found: Coverage) -> None:
    rows = found.buckets()["by_size"]
    names = [r["bucket"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, s in (("coverage", POSITIVE), ("low_quality_only", LOW_QUALITY), ("no_anchor", NONE)):
        values = [r[key] for r in rows]
        ax.bar(names, values, bottom=bottom, color=COLOURS[s], label=STATUS_NAMES[s])
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows):
        ax.text(i, 1.01, str(r["boxes"]), ha="center", fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of boxes (count above)")
    ax.set_title("by size: sqrt(w h) after resizing")
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.legend(fontsize=8, loc="lower right")
