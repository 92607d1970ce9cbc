"""Test-time augmentation: a model's detections of several views of each image (flips, turns by 90 degrees), mapped
back and fused into one set (retinanet.ops.tta). The option `tta` of `retinanet eval`, `retinanet detect` and the
Predictor names the views: "flips" (3 passes), "turns" (4) or "d4" (all 8); it costs that many forward passes.

Worth it where the objects look alike in every orientation (trees, cells, stars from above): the fused boxes are
averages of several placements, better fitted than any one of them, and objects only one view found score lower.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retinanet.model import RetinaNet
from retinanet.ops.postprocess import Detections
from retinanet.ops.tta import TTA_VIEWS, boxes_from_view, fuse_detections, view_image

__all__ = ["TTA_CHOICES", "check_tta", "predict_views"]

TTA_CHOICES = tuple(TTA_VIEWS)


def check_tta(tta: str | None) -> str | None:
    """tta itself, or a ValueError naming the choices."""
    if tta is not None and tta not in TTA_VIEWS:
        raise ValueError(f"tta = {tta!r} is not one of {list(TTA_CHOICES)} (or None: no test-time augmentation)")
    return tta


@torch.no_grad()
def predict_views(
    model: RetinaNet, images: list[Tensor], tta: str, score_thresh: float | None = None
) -> list[Detections]:
    """Detections of resized float [3, h, w] images (as `model.predict(..., resize=False)` takes them), each fused
    from the views `tta` names; boxes in the images' pixels, at most the model's detections_per_image."""
    views = TTA_VIEWS[check_tta(tta)]
    found = [
        model.predict([view_image(im, v) for im in images], resize=False, score_thresh=score_thresh) for v in views
    ]
    out = []
    for i, image in enumerate(images):
        size = (int(image.shape[-2]), int(image.shape[-1]))
        boxes = torch.cat([boxes_from_view(per_view[i].boxes.float(), v, size) for v, per_view in zip(views, found)])
        scores = torch.cat([per_view[i].scores.float() for per_view in found])
        labels = torch.cat([per_view[i].labels for per_view in found])
        out.append(fuse_detections(boxes, scores, labels, len(views), max_detections=model.config.detections_per_image))
    return out
