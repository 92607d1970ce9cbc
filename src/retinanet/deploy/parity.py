"""Parity of an exported model with PyTorch: the engine's detections against our model's, image by image, each image
alone and all in one batch (`verify_export`, run by `retinanet export`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from retinanet.config import ModelConfig
from retinanet.data import SyntheticShapes
from retinanet.deploy.engines import OnnxPredictor
from retinanet.inference.predictor import Predictor
from retinanet.model import RetinaNet
from retinanet.ops.postprocess import Detections

__all__ = ["Agreement", "ExportReport", "compare_detections", "compare_engines", "sample_images", "verify_export"]


@dataclass
class Agreement:
    """How one set of detections compares with a reference, image by image.

    matched: detections found in both (same label, every box coordinate within box_tol px, score within
    score_tol); missing / extra: the reference's detections the other lacks, and the other's the reference lacks;
    borderline: those of missing and extra whose score is within score_tol of a cut-off (the score threshold, or the
    lowest score kept by an image that has its full detections_per_image), where the last bit of arithmetic
    decides which side a detection falls on; max_box_diff, max_score_diff: over the matched.
    """

    matched: int = 0
    missing: int = 0
    extra: int = 0
    borderline: int = 0
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0

    @property
    def identical(self) -> bool:
        return self.missing == 0 and self.extra == 0

    @property
    def ok(self) -> bool:
        """Identical up to detections at a cut-off."""
        return self.missing + self.extra == self.borderline

    def describe(self) -> str:
        text = (
            f"{self.matched} matched (boxes within {self.max_box_diff:.2g} px, scores within "
            f"{self.max_score_diff:.2g}), {self.missing} missing, {self.extra} extra"
        )
        return text + (f" ({self.borderline} of them at a score cut-off)" if self.borderline else "")


def compare_detections(
    reference: Sequence[Detections],
    other: Sequence[Detections],
    box_tol: float = 0.5,
    score_tol: float = 1e-3,
    score_thresh: float | None = None,
    limit: int | None = None,
) -> Agreement:
    """Match `other`'s detections to the reference's, image by image (see Agreement). score_thresh and limit (the
    model's score_thresh and detections_per_image) say where the cut-offs are."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference images but {len(other)} compared")
    total = Agreement()
    for ref, oth in zip(reference, other):
        matched_ref, matched_oth, box_diff, score_diff = _match(ref, oth, box_tol, score_tol)
        cutoffs = [c for c in (score_thresh,) if c is not None]
        for d in (ref, oth):
            if limit is not None and len(d.scores) >= limit:
                cutoffs.append(float(d.scores.min()))
        unmatched = torch.cat([ref.scores[~matched_ref], oth.scores[~matched_oth]]).float()
        borderline = sum(any(abs(float(s) - c) <= score_tol for c in cutoffs) for s in unmatched)
        total.matched += int(matched_ref.sum())
        total.missing += int((~matched_ref).sum())
        total.extra += int((~matched_oth).sum())
        total.borderline += borderline
        total.max_box_diff = max(total.max_box_diff, box_diff)
        total.max_score_diff = max(total.max_score_diff, score_diff)
    return total


def _match(ref: Detections, oth: Detections, box_tol: float, score_tol: float) -> tuple[Tensor, Tensor, float, float]:
    """Greedy one-to-one matching by decreasing reference score, each to the closest box of the same label within
    the tolerances: (matched_ref [N] bool, matched_other [M] bool, largest box difference, largest score
    difference among the matched)."""
    matched_ref = torch.zeros(len(ref.scores), dtype=torch.bool)
    matched_oth = torch.zeros(len(oth.scores), dtype=torch.bool)
    if len(ref.scores) == 0 or len(oth.scores) == 0:
        return matched_ref, matched_oth, 0.0, 0.0
    box_diff = (ref.boxes.double()[:, None] - oth.boxes.double()[None]).abs().amax(-1)  # [N, M]
    score_diff = (ref.scores.double()[:, None] - oth.scores.double()[None]).abs()
    close = (box_diff <= box_tol) & (score_diff <= score_tol) & (ref.labels[:, None] == oth.labels[None])
    worst_box = worst_score = 0.0
    for i in ref.scores.argsort(descending=True).tolist():
        candidates = torch.nonzero(close[i] & ~matched_oth).squeeze(1)
        if len(candidates) == 0:
            continue
        j = int(candidates[box_diff[i, candidates].argmin()])
        matched_ref[i] = matched_oth[j] = True
        worst_box = max(worst_box, float(box_diff[i, j]))
        worst_score = max(worst_score, float(score_diff[i, j]))
    return matched_ref, matched_oth, worst_box, worst_score


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """The parity checks of an export: per check (what was run, its Agreement with PyTorch)."""

    path: Path
    checks: list[tuple[str, Agreement]]
    int8: tuple[Path, Agreement] | None = None  # the INT8 model and its detections against the float32 export's

    @property
    def ok(self) -> bool:
        return all(a.ok for _, a in self.checks)

    @property
    def compared(self) -> int:
        return sum(a.matched + a.missing for _, a in self.checks)

    def describe(self) -> str:
        lines = [f"{what}: {a.describe()}" for what, a in self.checks]
        if self.int8 is not None:
            lines.append(
                f"INT8 model {self.int8[0]}, against the float32 export (boxes within 2 px, scores within "
                f"0.05): {self.int8[1].describe()}"
            )
        if self.compared == 0:
            lines.append(
                "the model found nothing in the sample images, so no detection was compared: give images "
                "it finds objects in (--check-images)"
            )
        return "\n".join(lines)


def sample_images(config: ModelConfig, count: int = 2) -> list[Tensor]:
    """Images of two sizes for the parity check: synthetic shapes, uint8 [3, H, W], a landscape one
    (min_size x 4/3 min_size) and a portrait one (6/5 min_size x min_size)."""
    s = config.min_size
    sizes = [(s, round(s * 4 / 3)), (round(s * 6 / 5), s)]
    images = []
    for i in range(count):
        pil = SyntheticShapes("val", num_images=1, image_size=sizes[i % 2], seed=i).load_image(0)
        images.append(torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1))
    return images


def verify_export(
    model: RetinaNet, path: str | Path, images: Sequence[Tensor] | None = None, engine: str = "onnxruntime"
) -> ExportReport:
    """Run the exported file by `engine` against `model` in PyTorch on `images` ([3, H, W], default:
    `sample_images`): each image alone (batch 1) and all of them together (batch len(images)); same detections
    means same labels, boxes within 0.5 px and scores within 1e-3 (`compare_detections`)."""
    images = list(images) if images is not None else sample_images(model.config)
    runner = OnnxPredictor(path, engine)
    eager = Predictor(copy.deepcopy(model).cpu(), device="cpu")
    eager.model_resizes = False  # the engine's input: resized on the host, so compare with the same pixels
    cfg = model.config
    checks = []
    for batch in [[im] for im in images] + [images]:
        prepared = [runner.prepare(im) for im in batch]
        inputs, scales = [p for p, _ in prepared], [s for _, s in prepared]
        reference = _padded_like(eager, inputs, scales, runner.image_size)
        found = runner.detect_prepared(inputs, scales)
        shapes = " and ".join("x".join(str(int(v)) for v in im.shape[-2:]) for im in inputs)
        agreement = compare_detections(reference, found, score_thresh=cfg.score_thresh, limit=cfg.detections_per_image)
        checks.append((f"{engine}, batch {len(batch)} ({shapes})", agreement))
    return ExportReport(Path(path), checks)


def _padded_like(
    eager: Predictor, images: list[Tensor], scales: list[tuple[float, float]], fixed_size: tuple[int, int] | None
) -> list[Detections]:
    """PyTorch's detections of prepared images padded as the exported graph pads them: to the fixed input size by
    a blank image in the same batch (the batch pads to its largest image), its detections then dropped."""
    if fixed_size is None:
        return eager.detect_prepared(images, scales)
    blank = torch.zeros(3, *fixed_size)
    return eager.detect_prepared(images + [blank], list(scales) + [(1.0, 1.0)])[:-1]


def compare_engines(
    reference: str | Path, other: str | Path, images: Sequence[Tensor], box_tol: float = 2.0, score_tol: float = 0.05
) -> Agreement:
    """How an exported model's detections (an INT8 one's, say) agree with another export's, by ONNX Runtime, on
    `images` ([3, H, W]) one at a time: rounding to 8 bits moves boxes and scores, so the tolerances are wider."""
    first, second = OnnxPredictor(reference), OnnxPredictor(other)
    found = [(first.detect_images([im])[0], second.detect_images([im])[0]) for im in images]
    cfg = first.config
    return compare_detections(
        [a for a, _ in found], [b for _, b in found], box_tol, score_tol, cfg.score_thresh, cfg.detections_per_image
    )
