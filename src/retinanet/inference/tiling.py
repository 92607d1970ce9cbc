"""Tiled inference for images larger than the model's input: overlapping tiles with their offsets, detected a
batch at a time, merged class by class so that an object cut by a tile border is found once, whole.

    det = retinanet.load("runs/x/last.pt", tile=800, overlap=0.2)
    found = det.predict("orthophoto.tif")             # or: retinanet detect --tile 800 --overlap 0.2 ...

Why: the predictor resizes a whole image to the model's size (shorter side min_size, longer at most max_size), so a
10,000 px aerial image shrinks 7.5 times and a 30 px tree becomes 4 px. Tiles of `tile` px, each resized as
evaluation resizes (a tile of the model's min_size keeps its pixels), see objects at their own scale.

Merging. Detections are shifted by their tile's offset. A detection is *cut* when its box lies within
`border_margin` px of an inner border of its tile (a border that is not the image's): the object may go on beyond
it. Two detections of the same class from different tiles are *the same object* when, clipped to the region both
tiles see, their boxes overlap with IoU >= `match_iou`: inside that region both tiles see the same pixels, so the
two views of one object agree there, even when one of them is cut (a partial box clipped to the shared region is
the whole box clipped to it), while two neighbouring objects do not. Then, class by class:
- uncut detections, by decreasing score, each take the detections matched to them (NMS across tiles, by the
  clipped IoU) and the cut detections matched to those: an object that some tile sees whole keeps that tile's box,
  and its partial boxes from the other tiles are dropped;
- cut detections left (objects larger than any tile's view of them) are joined with the cut detections they
  match, transitively, into the union of their boxes: one box for an object stitched from its pieces.
A group's score is its best score. SAHI's default (greedy merging of boxes whose intersection over the smaller
box is >= 0.5, with the union as the box) also joins a partial box to a whole one, but it joins any two boxes of
a class one of which mostly covers the other, across tiles and within one: neighbouring objects in dense scenes.

Memory: tiles are views of the uint8 image; only a batch of tiles is resized and made float, so the memory used
beyond the decoded uint8 image is bounded by batch_size x tile size, however large the image. An image too large
to decode whole is read a batch of windows at a time (detect_windows, retinanet.inference.rasters).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from retinanet.ops.postprocess import Detections

__all__ = ["Window", "detect_tiled", "detect_windows", "merge_tiles", "tile_windows"]

DetectFn = Callable[[list[Tensor]], list[Detections]]


class Window(NamedTuple):
    """A tile: rows y0..y1 and columns x0..x1 (end exclusive) of the image."""

    y0: int
    x0: int
    y1: int
    x1: int


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every `stride` px, the last one moved back to end at the image's edge."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def tile_windows(height: int, width: int, tile: int, overlap: float = 0.2) -> list[Window]:
    """Tiles of tile x tile px (smaller only where the image is) covering the image row by row, neighbours sharing
    at least `overlap` of a tile: stride round(tile * (1 - overlap)); the last row and column end at the edge."""
    if tile < 1:
        raise ValueError(f"tile must be at least 1 px, got {tile}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    stride = max(1, round(tile * (1 - overlap)))
    return [
        Window(y, x, min(y + tile, height), min(x + tile, width))
        for y in _starts(height, tile, stride)
        for x in _starts(width, tile, stride)
    ]


def detect_tiled(
    image: Tensor,
    detect: DetectFn,
    tile: int,
    overlap: float = 0.2,
    batch_size: int = 4,
    score_thresh: float = 0.0,
    match_iou: float = 0.5,
    border_margin: float = 4.0,
) -> Detections:
    """Detections of one image [3, H, W] (uint8, or float in [0, 1]) in its own pixels, tile by tile.

    detect: crops [3, h, w] -> their Detections in the crops' pixels (the predictor's `detect_images`), called with
    up to batch_size tiles at a time. Detections under score_thresh are dropped before merging (see the module
    docstring for match_iou and border_margin). Returns Detections by decreasing score."""
    height, width = image.shape[-2:]
    return detect_windows(
        lambda w: image[:, w.y0 : w.y1, w.x0 : w.x1],
        (int(height), int(width)),
        detect,
        tile,
        overlap,
        batch_size,
        score_thresh,
        match_iou,
        border_margin,
    )


def detect_windows(
    read: Callable[[Window], Tensor],
    size_hw: tuple[int, int],
    detect: DetectFn,
    tile: int,
    overlap: float = 0.2,
    batch_size: int = 4,
    score_thresh: float = 0.0,
    match_iou: float = 0.5,
    border_margin: float = 4.0,
) -> Detections:
    """detect_tiled of an image given by a reader of its windows, read(window) -> [3, h, w] (a raster read window
    by window: retinanet.inference.rasters), so that only a batch of tiles is ever in memory."""
    height, width = size_hw
    windows = tile_windows(height, width, tile, overlap)
    per_tile: list[Detections] = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        found = detect([read(w) for w in chunk])
        for d, w in zip(found, chunk):
            keep = d.scores >= score_thresh
            offset = torch.tensor([w.x0, w.y0, w.x0, w.y0], dtype=d.boxes.dtype)
            per_tile.append(Detections(d.boxes[keep] + offset, d.scores[keep], d.labels[keep]))
    return merge_tiles(per_tile, windows, (int(height), int(width)), match_iou, border_margin)


def merge_tiles(
    detections_per_tile: list[Detections],
    windows: list[Window],
    image_size_hw: tuple[int, int],
    match_iou: float = 0.5,
    border_margin: float = 4.0,
) -> Detections:
    """One set of detections from the tiles' (boxes in image pixels), merged as the module docstring says."""
    if len(detections_per_tile) != len(windows):
        raise ValueError(f"{len(detections_per_tile)} sets of detections for {len(windows)} tiles")
    boxes = torch.cat([d.boxes.float().reshape(-1, 4) for d in detections_per_tile])
    scores = torch.cat([d.scores.float() for d in detections_per_tile])
    labels = torch.cat([d.labels.long() for d in detections_per_tile])
    tile_of = torch.cat([torch.full((len(d.scores),), i) for i, d in enumerate(detections_per_tile)])
    if len(scores) == 0:
        return Detections(boxes, scores, labels)
    cut = _is_cut(boxes, torch.tensor(windows, dtype=torch.float32)[tile_of], image_size_hw, border_margin)
    neighbours = _matches(boxes, labels, tile_of, windows, match_iou)
    groups = _groups(cut.tolist(), scores.tolist(), neighbours)
    out_boxes = torch.stack([boxes[g[0]] if not cut[g[0]] else _union(boxes[g]) for g in groups])
    out_scores = torch.stack([scores[g].max() for g in groups])
    out_labels = labels[[g[0] for g in groups]]
    order = out_scores.argsort(descending=True, stable=True)
    return Detections(out_boxes[order], out_scores[order], out_labels[order])


def _is_cut(boxes: Tensor, windows_yxyx: Tensor, image_size_hw: tuple[int, int], margin: float) -> Tensor:
    """[N] bool: the box lies within `margin` px of an inner border of its tile (windows_yxyx [N, 4] y0 x0 y1 x1)."""
    y0, x0, y1, x1 = windows_yxyx.unbind(1)
    height, width = image_size_hw
    left = (x0 > 0) & (boxes[:, 0] <= x0 + margin)
    top = (y0 > 0) & (boxes[:, 1] <= y0 + margin)
    right = (x1 < width) & (boxes[:, 2] >= x1 - margin)
    bottom = (y1 < height) & (boxes[:, 3] >= y1 - margin)
    return left | top | right | bottom


def _matches(
    boxes: Tensor, labels: Tensor, tile_of: Tensor, windows: list[Window], match_iou: float
) -> list[list[int]]:
    """Per detection, the detections of other tiles that are the same object: same class and IoU >= match_iou of
    the two boxes clipped to the region both tiles see."""
    neighbours: list[list[int]] = [[] for _ in range(len(labels))]
    members = [torch.nonzero(tile_of == t).squeeze(1) for t in range(len(windows))]
    for i, j, region in _overlapping_pairs(windows):
        a, b = members[i], members[j]
        if len(a) == 0 or len(b) == 0:
            continue
        ca, cb = _clip(boxes[a], region), _clip(boxes[b], region)
        valid = (_area(ca)[:, None] > 0) & (_area(cb)[None, :] > 0)
        iou = box_iou(ca, cb).nan_to_num(0.0)
        same = valid & (labels[a][:, None] == labels[b][None, :]) & (iou >= match_iou)
        for u, v in torch.nonzero(same).tolist():
            neighbours[int(a[u])].append(int(b[v]))
            neighbours[int(b[v])].append(int(a[u]))
    return neighbours


def _overlapping_pairs(windows: list[Window]) -> list[tuple[int, int, Window]]:
    """(i, j, shared region) of every pair of tiles i < j that share pixels."""
    w = torch.tensor(windows, dtype=torch.int64)  # [T, 4] y0 x0 y1 x1
    y0 = torch.maximum(w[:, None, 0], w[None, :, 0])
    x0 = torch.maximum(w[:, None, 1], w[None, :, 1])
    y1 = torch.minimum(w[:, None, 2], w[None, :, 2])
    x1 = torch.minimum(w[:, None, 3], w[None, :, 3])
    shared = torch.triu((y1 > y0) & (x1 > x0), diagonal=1)
    return [
        (i, j, Window(int(y0[i, j]), int(x0[i, j]), int(y1[i, j]), int(x1[i, j])))
        for i, j in torch.nonzero(shared).tolist()
    ]


def _clip(boxes: Tensor, region: Window) -> Tensor:
    x = boxes[:, 0::2].clamp(region.x0, region.x1)
    y = boxes[:, 1::2].clamp(region.y0, region.y1)
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _union(boxes: Tensor) -> Tensor:
    return torch.cat((boxes[:, :2].amin(0), boxes[:, 2:].amax(0)))


def _groups(cut: list[bool], scores: list[float], neighbours: list[list[int]]) -> list[list[int]]:
    """Detections grouped into objects, each group's first member its representative (see the module docstring):
    uncut detections first by decreasing score, each taking its matches and the cut detections matched to any of
    them; then the cut detections left, joined transitively with the cut detections they match."""
    order = sorted(range(len(cut)), key=lambda i: (cut[i], -scores[i]))
    taken = [False] * len(cut)
    groups = []
    for i in order:
        if taken[i]:
            continue
        group, taken[i] = [i], True
        if not cut[i]:
            for j in neighbours[i]:
                if not taken[j]:
                    group.append(j)
                    taken[j] = True
        # cut detections matched to any member join the group (transitively: the pieces of one large object)
        pending = list(group)
        while pending:
            for j in neighbours[pending.pop()]:
                if cut[j] and not taken[j]:
                    group.append(j)
                    taken[j] = True
                    pending.append(j)
        groups.append(group)
    return groups
