"""How well a model's anchors fit a dataset's boxes (`retinanet anchors`, the coverage line at the start of training).

A training box is *covered* when training's own matcher (`match_anchors` with the model's fg_iou, bg_iou and
allow_low_quality_matches, on the anchors of the padded training-size image) gives it at least one anchor whose IoU
with it is >= fg_iou: a *positive* anchor. With allow_low_quality_matches a box whose best anchor is below fg_iou
still gets that anchor (*low-quality only*); a box can also get none (IoU 0 with every anchor, or its anchors taken
by boxes that overlap them more). A box the matcher leaves uncovered is the usual reason for "loss 0 / mAP 0".

Boxes are taken from the dataset's annotations, resized as training resizes them (each of model.training_sizes,
without the random flip), so that thousands of images take seconds: no pixel is decoded. Boxes touching the image
border (x1 = 0 or y1 = 0) are boxes like any other. As in training, boxes under 1 px after resizing are dropped
(and counted) and crowd regions are not targets. Each box's best IoU over the grid has a closed form
(`best_iou_on_grid`: the anchor of each shape nearest the box's centre, per level), which the anchor fit
(retinanet.tools.anchor_fit) searches with.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from retinanet.config import ModelConfig
from retinanet.ops.anchors import AnchorGenerator, anchor_generator, grid_sizes
from retinanet.ops.boxes import clip_boxes
from retinanet.ops.matching import anchor_counts, match_anchors
from retinanet.ops.resize import padded_size, resized_size
from retinanet.tools.anchor_grid import GridOffsets, best_iou_on_grid

__all__ = [
    "LOW_QUALITY",
    "NONE",
    "POSITIVE",
    "STATUS_NAMES",
    "BoxSet",
    "Coverage",
    "ImageStatus",
    "level_shapes",
    "best_ious",
    "box_status",
    "coverage",
    "coverage_lines",
    "one_thread",
    "resize_boxes",
    "training_boxes",
]

NONE, LOW_QUALITY, POSITIVE = 0, 1, 2  # a box's status: no anchor, low-quality matches only, a positive anchor
STATUS_NAMES = ("no anchor", "low-quality only", "positive")
SIZE_EDGES = (8, 16, 32, 64, 128, 256, 512)  # buckets of sqrt(w h) after resizing, px
RATIO_EDGES = tuple(2 ** (k + 0.5) for k in range(-3, 3))  # buckets of h / w around 1/8, 1/4, ..., 4, 8
RATIO_NAMES = ("h/w < 0.18", "h/w ~ 1/4", "h/w ~ 1/2", "h/w ~ 1", "h/w ~ 2", "h/w ~ 4", "h/w > 5.7")


@contextlib.contextmanager
def one_thread():
    """Torch on one thread inside: the tools run thousands of tiny tensor operations, for which OpenMP's threads
    only wait on each other (7x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def level_shapes(generator: AnchorGenerator) -> Tensor:
    """[L, A, 2] float64 (width, height) of each level's anchors, as generated (rounded where the generator is)."""
    per_level = generator.base_anchors_per_level
    return torch.stack([torch.stack((b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), 1) for b in per_level])


def _candidates(
    generator: AnchorGenerator,
    grids: list[tuple[int, int]],
    padded_hw: tuple[int, int],
    boxes: Tensor,
    best_iou: Tensor,
    bg_iou: float,
) -> Tensor:
    """Indices into the image's anchors (all levels, ascending) of those that can matter to the matcher: for some
    box, IoU >= min(bg_iou, the box's best IoU) may hold. Every other anchor has IoU < bg_iou with every box and is
    no box's best, so the matcher makes it background; on these alone it gives each the same result as on all.

    The test is a bound on the centre distance: IoU >= t needs an intersection I >= t (area_box + area_anchor) /
    (1 + t), hence an overlap of at least I / min(heights) along x, so |dx| <= (w_box + w_anchor) / 2 - that."""
    shapes = level_shapes(generator)[None]  # [1, L, A, 2]
    num_types = shapes.shape[2]
    strides = torch.tensor(generator.strides_for(grids, padded_hw), dtype=torch.float64).flip(-1)[None, :, None]  # x, y
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


def box_status(
    cfg: ModelConfig,
    boxes: Tensor,
    padded_hw: tuple[int, int],
    generator: AnchorGenerator | None = None,
    best_iou: Tensor | None = None,
) -> ImageStatus:
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
    return best_iou_on_grid(GridOffsets.of_image(boxes, padded_hw, generator), level_shapes(generator)).float()


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


def training_boxes(
    records: Sequence[Any], cfg: ModelConfig, sizes: Iterable[int] | None = None, one_size_each: bool = False
) -> BoxSet:
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
    reachable: Tensor | None = None  # [N] bool: some anchor shape could reach fg_iou at this size (`reachable`)

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
        share = {
            k: (float((status == s).sum()) / n if n else None)
            for k, s in (("coverage", POSITIVE), ("low_quality_only", LOW_QUALITY), ("no_anchor", NONE))
        }
        return {"boxes": n, **share}

    def buckets(self) -> dict[str, list[dict[str, Any]]]:
        """Shares by size (sqrt of the area after resizing) and by aspect ratio h / w; empty buckets left out."""
        side = (self.wh[:, 0] * self.wh[:, 1]).sqrt()
        ratio = self.wh[:, 1] / self.wh[:, 0]
        size_names = [f"< {SIZE_EDGES[0]} px"] + [f"{a}-{b} px" for a, b in zip(SIZE_EDGES, SIZE_EDGES[1:])]
        size_names.append(f">= {SIZE_EDGES[-1]} px")
        by_size = torch.bucketize(side, torch.tensor(SIZE_EDGES, dtype=side.dtype), right=True)
        by_ratio = torch.bucketize(ratio, torch.tensor(RATIO_EDGES, dtype=ratio.dtype), right=True)
        return {
            "by_size": [
                {"bucket": n, **self.shares(by_size == i)}
                for i, n in enumerate(size_names)
                if bool((by_size == i).any())
            ],
            "by_aspect_ratio": [
                {"bucket": n, **self.shares(by_ratio == i)}
                for i, n in enumerate(RATIO_NAMES)
                if bool((by_ratio == i).any())
            ],
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the shares overall and by bucket, the best IoUs' quantiles, what was left out."""
        q = (
            torch.quantile(self.best_iou.double(), torch.tensor([0.05, 0.25, 0.5], dtype=torch.float64)).tolist()
            if self.num_boxes
            else [None] * 3
        )
        return {
            **self.shares(),
            "fg_iou": self.fg_iou,
            "images": self.images,
            "best_iou": {
                "mean": float(self.best_iou.mean()) if self.num_boxes else None,
                "p5": q[0],
                "p25": q[1],
                "median": q[2],
            },
            "dropped_under_1px": self.dropped,
            "crowd_ignored": self.crowd,
            **self.buckets(),
        }

    def describe(self) -> str:
        """One line: the coverage and what the other boxes get."""
        if not self.num_boxes:
            return "anchors: the training set has no boxes"
        s = self.shares()
        dropped = f"; {self.dropped} boxes under 1 px after resizing are dropped by training" if self.dropped else ""
        return (
            f"anchors: {100 * s['coverage']:.1f}% of the {self.num_boxes} training boxes have an anchor at IoU "
            f">= {self.fg_iou:g} ({100 * s['low_quality_only']:.1f}% only low-quality matches, "
            f"{100 * s['no_anchor']:.1f}% none){dropped}"
        )


def coverage_lines(found: Coverage, least: float = 0.95) -> list[str]:
    """The training log's lines: the coverage, and below `least` a warning that names what fixes it: anchors that
    fit (`retinanet anchors --fit`) where anchors of other shapes would cover the boxes, a larger image size where
    most uncovered boxes are too small for the anchor grid at this size (anchors already fitted, or tiny objects)."""
    lines = [found.describe()]
    if found.value is None or found.value >= least:
        return lines
    missed = found.status != POSITIVE
    small = float((~found.reachable[missed]).float().mean()) if found.reachable is not None else 0.0
    what = f"{100 * (1 - found.value):.1f}% of the training boxes have no anchor at IoU >= {found.fg_iou:g}"
    if small >= 0.5:
        lines.append(
            f"warning: {what}, and {100 * small:.0f}% of those are too small for any anchor on the grid at "
            "this image size (no anchor shape would reach it): raise model.min_size and max_size, or train "
            "on smaller tiles; `retinanet anchors --config RUN.yaml --output DIR --fit` proposes a size"
        )
    else:
        lines.append(
            f"warning: {what} (training learns a box from such anchors); `retinanet anchors --config "
            "RUN.yaml --output DIR --fit` shows which and proposes anchors that fit the data"
        )
    return lines


def reachable(box_set: BoxSet, generator: AnchorGenerator, fg_iou: float) -> Tensor:
    """[N] bool per box of `box_set`: whether an anchor of the box's own shape, centred on the nearest point of some
    level's grid, reaches fg_iou. False for a box too small for the grid at this size (a 6 px object on a stride-8
    grid): no fitted anchor can match it, a larger image size can."""
    offsets = GridOffsets.of(box_set, generator)
    if not len(offsets.wh):
        return torch.zeros(0, dtype=torch.bool)
    wh = offsets.wh[:, None, :]  # [N, 1, 2]
    inter = (wh - offsets.d).clamp(min=0).prod(-1)  # [N, L]: same-size boxes offset by d
    return (inter / (2 * wh.prod(-1) - inter)).max(1).values >= fg_iou


@one_thread()
def coverage(box_set: BoxSet, cfg: ModelConfig) -> Coverage:
    """Training's matcher on every entry of `box_set` with the anchors of `cfg` (see the module docstring)."""
    generator = anchor_generator(cfg)
    best = _best_ious_per_entry(box_set, generator)
    status = [
        box_status(cfg, boxes, padded, generator, b).status
        for boxes, padded, b in zip(box_set.boxes_per_entry, box_set.padded_sizes, best)
        if len(boxes)
    ]
    boxes = box_set.all_boxes()
    return Coverage(
        best_iou=torch.cat(best) if best else torch.zeros(0),
        status=torch.cat(status) if status else torch.zeros(0, dtype=torch.int64),
        wh=boxes[:, 2:] - boxes[:, :2],
        images=box_set.images,
        dropped=box_set.dropped,
        crowd=box_set.crowd,
        fg_iou=cfg.fg_iou,
        reachable=reachable(box_set, generator, cfg.fg_iou),
    )


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
