"""Detections drawn on images (torchvision's draw_bounding_boxes), labelled while the labels stay readable."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

__all__ = [
    "DRAW_MODES",
    "draw_detections",
    "label_font",
    "label_style",
    "labels_readable",
    "save_detections_image",
    "upscale_small",
    "with_labels",
]

_PALETTE = [
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
    "#469990",
    "#dcbeff",
    "#9a6324",
    "#800000",
    "#aaffc3",
    "#808000",
    "#000075",
]


DRAW_MODES = ("auto", "labels", "boxes")  # and "none" where a command draws nothing
# labels are drawn (in "auto") while they stay readable: few enough, on boxes tall enough to carry them, covering
# little of the image
READABLE_LABELS = 60
LABEL_COVER = 0.25


def draw_detections(
    image: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor, class_names: Sequence[str], mode: str = "auto"
) -> Tensor:
    """image: float [3, H, W] in [0, 1]; boxes [N, 4] XYXY pixels; scores [N]; labels [N] -> uint8 [3, H, W].
    mode: "labels" (each box with its class and score), "boxes" (boxes alone, coloured by class), or "auto" (labels
    while they stay readable, `labels_readable`, else boxes alone)."""
    image, boxes = upscale_small(image.detach().cpu(), boxes.detach().cpu().float())
    img = (image.clamp(0, 1) * 255).to(torch.uint8)
    if len(boxes) == 0:
        return img
    names = [class_names[int(lab)] if int(lab) < len(class_names) else str(int(lab)) for lab in labels]
    text = [f"{n} {float(s):.2f}" for n, s in zip(names, scores)]
    colors = [_PALETTE[int(lab) % len(_PALETTE)] for lab in labels]
    size, width = label_style(tuple(img.shape[-2:]))
    side = float((boxes[:, 2:] - boxes[:, :2]).min(1).values.median())
    width = max(1, min(width, round(side / 10)))  # lines thin enough not to hide small objects
    if not with_labels(mode, boxes, text, tuple(img.shape[-2:])):
        return draw_bounding_boxes(img, boxes, colors=colors, width=width)
    return draw_bounding_boxes(
        img,
        boxes,
        labels=text,
        colors=colors,
        width=width,
        font=label_font(),
        font_size=size,
        label_colors="white",
        fill_labels=True,
    )


def with_labels(mode: str, boxes: Tensor, text: Sequence[str], image_hw: tuple[int, int]) -> bool:
    """Whether a drawing in `mode` carries labels (see draw_detections)."""
    if mode not in DRAW_MODES:
        raise ValueError(f"draw mode {mode!r} is not one of {list(DRAW_MODES)} (or none: no drawing)")
    return mode == "labels" or (mode == "auto" and labels_readable(boxes, text, image_hw))


def labels_readable(boxes: Tensor, text: Sequence[str], image_hw: tuple[int, int]) -> bool:
    """Whether labels `text` on `boxes` (XYXY pixels of an image of image_hw, as drawn) stay readable: at most
    READABLE_LABELS of them, the boxes' median height at least the label's, and the labels covering at most
    LABEL_COVER of the image (a dense scene's labels would hide it)."""
    if len(boxes) > READABLE_LABELS:
        return False
    if len(boxes) == 0:
        return True
    size, _ = label_style(image_hw)
    heights = boxes[:, 3] - boxes[:, 1]
    cover = sum((0.6 * size * len(t) + 4) * (size + 4) for t in text)  # DejaVu Sans: about 0.6 em per character
    return float(heights.median()) >= size + 4 and cover <= LABEL_COVER * image_hw[0] * image_hw[1]


def label_style(image_hw: tuple[int, int]) -> tuple[int, int]:
    """(font size, box line width) in px for drawing on an image of this size: larger with the image, but capped,
    so that on a large image (a 2,000 px mosaic, a scan) labels stay readable without covering it."""
    side = min(image_hw)
    return max(10, min(20, round(side / 32))), max(1, min(4, round(side / 200)))


def label_font() -> str | None:
    """matplotlib's DejaVu Sans (always installed with it), for legible labels; None = PIL's small bitmap font."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(path) if path.is_file() else None


def upscale_small(image: Tensor, boxes: Tensor, min_side: int = 384) -> tuple[Tensor, Tensor]:
    """Small images are drawn enlarged (nearest, by an integer factor) so that the label text stays legible."""
    factor = -(-min_side // min(image.shape[-2:]))
    if factor <= 1:
        return image, boxes
    return image.repeat_interleave(factor, -2).repeat_interleave(factor, -1), boxes * factor


def save_detections_image(
    path: str | Path, image: Tensor, boxes, scores, labels, class_names, mode: str = "auto"
) -> Path:
    """The image with its detections drawn (draw_detections, in `mode`) as a PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn = draw_detections(image, boxes, scores, labels, class_names, mode)
    Image.fromarray(drawn.permute(1, 2, 0).contiguous().numpy()).save(path)
    return path
