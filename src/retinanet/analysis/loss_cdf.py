"""Figure 4 of the paper: how the loss of a trained model is spread over its positive and its negative anchors.

The model runs over a validation set (evaluation resize); each anchor is matched by the model's own rule
(RetinaNet.assign: IoU >= fg_iou positive, < bg_iou negative, in between ignored). For each gamma the focal loss
is applied to the same logits, and per kind (positive, negative) the losses are normalised to sum to 1, sorted
from low to high, and accumulated: the curve's point (x, y) says that the x easiest anchors carry y of the loss.

What one sample is (the paper counts anchors: ~10^5 positive and ~10^7 negative "windows"):
- a positive anchor: FL of its assigned class's output with y = 1, the binary problem that makes it a positive;
- a negative anchor: FL with y = 0 summed over the K classes, that anchor's whole part of the training loss.
Ignored anchors, and anchors centred outside the image (in a batch's padding, or on its far edge), are excluded
and counted, so that batching does not change the result. alpha is left out: within one kind it is a constant
factor, which normalising removes.

Memory is bounded whatever the number of anchors: losses go into fixed log-spaced histograms (`LossHistogram`:
per bin the count and the exact float64 sum of the losses), never one sort of everything. The curve's points at
bin edges are exact; inside a bin, where the order is not kept, the curve is interpolated linearly. The k smallest
of n losses in [a, r a) have a mean between 1/r and 1 times the bin's mean, so the interpolated y is off by at most
(1 - 1/r) times that bin's share of the loss (r = 10^(1/bins_per_decade): 3.5% of one bin's share at 64 bins per
decade), and by at most the whole share of the open-ended first and last bins. `LossHistogram.max_error` is this
bound, reported with every curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from retinanet.analysis.plots import Panel, save_line_plot, write_csv
from retinanet.config import DataConfig
from retinanet.data import make_loader
from retinanet.data.build import build_dataset
from retinanet.inference.predictor import categories_of
from retinanet.model.checkpoint import load_model
from retinanet.model.detector import RetinaNet
from retinanet.ops.losses import sigmoid_focal_loss
from retinanet.ops.matching import BACKGROUND
from retinanet.runtime import fastpath
from retinanet.runtime.device import resolve_device
from retinanet.runtime.outputs import write_json

__all__ = [
    "FIGURE4_GAMMAS",
    "HARDEST_FRACTIONS",
    "LossHistogram",
    "LossCdf",
    "anchor_losses",
    "loss_cdf",
    "write_loss_cdf",
    "describe",
    "run_loss_cdf",
]

FIGURE4_GAMMAS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
HARDEST_FRACTIONS: tuple[float, ...] = (0.01, 0.1, 0.2)
KINDS = ("positive", "negative")


@dataclass
class LossHistogram:
    """Counts and summed losses in bins: [0, lo), then bins_per_decade log-spaced bins per decade from lo to hi,
    then [hi, inf). Float64 throughout; `add` any number of times, in any order."""

    lo: float = 1e-30
    hi: float = 1e4
    bins_per_decade: int = 64
    counts: Tensor = field(init=False)
    sums: Tensor = field(init=False)

    def __post_init__(self) -> None:
        decades = math.log10(self.hi) - math.log10(self.lo)
        self.edges = torch.logspace(
            math.log10(self.lo), math.log10(self.hi), round(decades * self.bins_per_decade) + 1, dtype=torch.float64
        )
        self.counts = torch.zeros(len(self.edges) + 1, dtype=torch.float64)
        self.sums = torch.zeros(len(self.edges) + 1, dtype=torch.float64)

    def add(self, losses: Tensor) -> None:
        """losses: [N] float >= 0 (any device); NaN is an error (it has no place in an order)."""
        x = losses.detach().double().reshape(-1).cpu()
        if torch.isnan(x).any():
            raise ValueError("loss-cdf: a loss is NaN (the model's outputs are not finite)")
        index = torch.bucketize(x, self.edges, right=True)  # 0: below lo; len(edges): at or above hi
        self.counts += torch.bincount(index, minlength=len(self.counts)).double()
        self.sums += torch.bincount(index, weights=x, minlength=len(self.sums))

    @property
    def total(self) -> float:
        return float(self.sums.sum())

    def cumulative(self) -> tuple[np.ndarray, np.ndarray]:
        """The curve at the edges of the non-empty bins: (fraction of samples [P], fraction of the loss [P]),
        both from 0 to 1 and non-decreasing, samples sorted from low to high loss."""
        keep = self.counts > 0
        n, s = self.counts[keep].cumsum(0), self.sums[keep].cumsum(0)
        x = torch.cat([torch.zeros(1, dtype=torch.float64), n / max(float(n[-1]), 1.0) if len(n) else n])
        y = torch.cat([torch.zeros(1, dtype=torch.float64), s / float(s[-1]) if len(s) and s[-1] > 0 else s])
        return x.numpy(), y.numpy()

    def hardest_share(self, fraction: float) -> float:
        """The share of the total loss carried by the `fraction` of samples with the highest loss."""
        x, y = self.cumulative()
        return float(1.0 - np.interp(1.0 - fraction, x, y))

    def max_error(self) -> float:
        """The largest possible error of the interpolated curve's y (see the module docstring)."""
        total = self.total
        if total <= 0:
            return 0.0
        share = self.sums / total
        factor = torch.full_like(share, 1.0 - 10 ** (-1.0 / self.bins_per_decade))
        factor[0] = factor[-1] = 1.0  # the open-ended bins: no ratio bounds their losses
        return float((share * factor).max())


def anchor_losses(logits: Tensor, labels: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """The per-anchor losses of one image (see the module docstring for what a sample is).

    Args:
        logits: [A, K] float class logits of the image's anchors.
        labels: [A] int64, a class in 0..K-1 (positive), BACKGROUND (negative) or anything else (excluded).
        gamma: the focusing parameter (0: CE).
    Returns:
        (positive losses [P] float64, negative losses [N] float64).
    """
    x = logits.double()
    positive = labels >= 0
    x_pos = x[positive].gather(1, labels[positive].unsqueeze(1))  # [P, 1]: a 2-D shape also when P = 0
    pos = sigmoid_focal_loss(x_pos, torch.ones_like(x_pos), alpha=-1.0, gamma=gamma).squeeze(1)
    x_neg = x[labels == BACKGROUND]
    neg = sigmoid_focal_loss(x_neg, torch.zeros_like(x_neg), alpha=-1.0, gamma=gamma).sum(1)
    return pos, neg


@dataclass
class LossCdf:
    """The histograms of a model's anchor losses per (kind, gamma), and the counts of anchors and images."""

    gammas: tuple[float, ...]
    histograms: dict[tuple[str, float], LossHistogram]
    counts: dict[str, int]

    def summary(self, fractions: Sequence[float] = HARDEST_FRACTIONS) -> dict:
        """Counts, and per kind and gamma the hardest fractions' shares of the loss and the curve's error bound."""
        curves = {}
        for (kind, gamma), h in self.histograms.items():
            curves[f"{kind} gamma {gamma:g}"] = {
                "kind": kind,
                "gamma": gamma,
                "total_loss": h.total,
                "hardest_share": {f"{f:g}": h.hardest_share(f) for f in fractions},
                "max_error": h.max_error(),
            }
        return {"counts": dict(self.counts), "curves": curves}


def _image_labels(model: RetinaNet, anchors: Tensor, target: dict, size_hw: tuple[int, int]) -> Tensor:
    """[A] int64 match labels of one image's anchors; anchors centred outside the image's (h, w) marked _OUTSIDE."""
    labels = model.assign(anchors, [target])[0][0]
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    in_image = (cx < size_hw[1]) & (cy < size_hw[0])
    return torch.where(in_image, labels, torch.full_like(labels, _OUTSIDE))


_OUTSIDE = -3  # an exclusion code of our own: neither a class, BACKGROUND nor IGNORE


@torch.no_grad()
def loss_cdf(
    model: RetinaNet,
    dataset: Dataset,
    gammas: Sequence[float] = FIGURE4_GAMMAS,
    batch_size: int = 8,
    num_workers: int = 0,
    bins_per_decade: int = 64,
) -> LossCdf:
    """Run `model` (on its own device, in eval mode) over `dataset` (evaluation transforms: dataset[i] =
    (image [3, H, W] in [0, 1], target with boxes in that image's pixels)) and histogram every anchor's loss for
    each gamma. Memory: one batch's outputs plus O(bins) per curve."""
    gammas = tuple(float(g) for g in gammas)
    if not gammas or any(g < 0 for g in gammas):
        raise ValueError(f"loss-cdf: gammas must be a non-empty list of values >= 0, got {list(gammas)}")
    was_training, layout = model.training, model.memory_format
    model.eval()
    device = next(model.parameters()).device
    hists = {(k, g): LossHistogram(bins_per_decade=bins_per_decade) for k in KINDS for g in gammas}
    counts = {"images": 0, "positive": 0, "negative": 0, "ignored": 0, "outside": 0}
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    for i, (images, targets) in enumerate(loader):
        images = [im.to(device) for im in images]
        if i == 0:
            fastpath.tune(model, images)  # the inference layout, as evaluation chooses it
        batch = model.preprocess(images, resize=False)
        head = model(batch.images)
        anchors = torch.cat(model.anchors_per_level(head, tuple(batch.images.shape[-2:])))
        for logits, target, size in zip(head.cls_logits, targets, batch.image_sizes):
            target = {k: target[k].to(device) for k in ("boxes", "labels", "iscrowd")}
            labels = _image_labels(model, anchors, target, size)
            _count(counts, labels)
            for g in gammas:
                pos, neg = anchor_losses(logits, labels, g)
                hists["positive", g].add(pos)
                hists["negative", g].add(neg)
    model.train(was_training)
    model.use_memory_format(layout)
    return LossCdf(gammas, hists, counts)


def _count(counts: dict[str, int], labels: Tensor) -> None:
    counts["images"] += 1
    counts["positive"] += int((labels >= 0).sum())
    counts["negative"] += int((labels == BACKGROUND).sum())
    counts["outside"] += int((labels == _OUTSIDE).sum())
    counts["ignored"] += int(((labels < 0) & (labels != BACKGROUND) & (labels != _OUTSIDE)).sum())


# --------------------------------------------------------------------------------------------------------------
def write_loss_cdf(result: LossCdf, folder: str | Path) -> list[Path]:
    """loss_cdf.png (the two panels of Figure 4), loss_cdf.csv (kind, gamma, fraction of anchors, cumulative
    normalised loss: the curves' points at bin edges) and loss_cdf.json (`LossCdf.summary`) in `folder`."""
    folder = Path(folder)
    rows, panels = [], []
    for kind in KINDS:
        n = result.counts[kind]
        panel = Panel(
            f"{kind} anchors",
            "fraction of anchors (sorted by loss)",
            "cumulative normalised loss",
            xlim=(0.0, 1.0),
            ylim=(0.0, 1.0),
            note=f"{n:,} anchors",
        )
        for g in result.gammas:
            x, y = result.histograms[kind, g].cumulative()
            panel.lines[f"gamma {g:g}"] = (x.tolist(), y.tolist())
            rows += [[kind, g, float(a), float(b)] for a, b in zip(x, y)]
        panels.append(panel)
    png = save_line_plot(folder / "loss_cdf.png", panels)
    csv = write_csv(folder / "loss_cdf.csv", ["kind", "gamma", "fraction_of_anchors", "cumulative_loss"], rows)
    return [png, csv, write_json(folder / "loss_cdf.json", result.summary(), indent=2)]


def describe(result: LossCdf, fractions: Sequence[float] = HARDEST_FRACTIONS) -> str:
    """A few lines for the terminal: counts, then per gamma the negatives' hardest shares."""
    c = result.counts
    lines = [
        f"{c['images']} images: {c['positive']:,} positive and {c['negative']:,} negative anchors "
        f"({c['ignored']:,} ignored and {c['outside']:,} centred outside the image: excluded)"
    ]
    head = ", ".join(f"hardest {100 * f:g}%" for f in fractions)
    lines.append(f"share of the negatives' loss carried by the ({head}) negatives:")
    for g in result.gammas:
        h = result.histograms["negative", g]
        shares = ", ".join(f"{h.hardest_share(f):.3f}" for f in fractions)
        lines.append(f"  gamma {g:g}: {shares}  (curve error at most {h.max_error():.1e})")
    return "\n".join(lines)


def run_loss_cdf(
    checkpoint: str | Path,
    data: DataConfig,
    output: str | Path,
    gammas: Sequence[float] = FIGURE4_GAMMAS,
    device: str = "auto",
    batch_size: int = 8,
    max_images: int | None = None,
) -> LossCdf:
    """The `retinanet analyze loss-cdf` job: a checkpoint's model over the validation set of DataConfig `data`
    (resized as the checkpoint's model config says), written by `write_loss_cdf` to `output`."""
    device = resolve_device(device)
    model = load_model(checkpoint, map_location=device).to(device)
    known = categories_of(model) if model.config.class_names else None
    dataset = build_dataset(data, model.config, "val", train_mode=False, categories=known)
    if dataset.num_classes != model.num_classes:
        raise ValueError(
            f"{checkpoint}: the model has {model.num_classes} classes but the validation data has {dataset.num_classes}"
        )
    if max_images is not None:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    result = loss_cdf(model, dataset, gammas, batch_size)
    write_loss_cdf(result, output)
    return result
