"""Anchors fitted to a dataset's boxes (`retinanet anchors --fit`): anchor sizes (doubling per level, so the base size
also chooses which level carries which size), scales and aspect ratios searched for the largest coverage, with the
closed form of each box's best IoU over the grid (retinanet.tools.anchor_coverage.best_iou_on_grid) in place of the
matcher; the coverage before and after is then computed exactly with the matcher.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from retinanet.config import ModelConfig, apply_overrides
from retinanet.ops.anchors import anchor_generator
from retinanet.tools.anchor_coverage import BoxSet, one_thread
from retinanet.tools.anchor_grid import GridOffsets, best_iou_on_grid

__all__ = ["AnchorLayout", "Fit", "fit_anchors"]


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
        rest = torch.cat(
            (
                torch.arange(1, self.num_scales, dtype=torch.float64) / self.num_scales,
                torch.quantile(log_ratio, qs).clamp(-4, 4),
            )
        )
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


@one_thread()
def fit_anchors(
    box_set: BoxSet,
    cfg: ModelConfig,
    max_anchors: int = 9,
    tolerance: float = 0.005,
    max_boxes: int = 5000,
    seed: int = 0,
) -> Fit:
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
        search = _Search(
            offsets, cfg.fg_iou, len(current.anchor_scales), len(current.aspect_ratios), generator.num_levels
        )
        score, params = search.descend(search.params_of(current))
        tried.append((score, search.layout(params)))
    most = max(score[0] for score, _ in tried)
    good = [(score, layout) for score, layout in tried if score[0] >= most - tolerance * n]
    _, chosen = min(good, key=lambda t: (t[1].num_anchors, -t[0][0], -t[0][1]))
    rows = [
        {"num_anchors": layout.num_anchors, "proxy_coverage": score[0] / n, **dataclasses.asdict(layout)}
        for score, layout in tried
    ]
    return Fit(chosen, rows)
