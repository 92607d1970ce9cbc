"""Looking at a dataset the way training sees it: images with their boxes coloured by what the anchors give them,
and statistics of the annotations. Headless: everything is written to files.

    images/NNNNN_<name>.png   one per image: the image after the transforms, each box green (it has a positive
                              anchor, IoU >= fg_iou), orange (only low-quality matches) or red (no anchor), crowd
                              regions grey; optionally each box's positive anchors, thin
    stats.json, stats.png     images, empty images, boxes per image, boxes and images per class, box sizes and
                              aspect ratios as stored and after the resize, crowd regions

The boxes' status is training's matcher on the anchors of the padded image (retinanet.tools.anchor_coverage), so a red
box here is a box the model is never taught to find.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from retinanet.config import ModelConfig
from retinanet.inference.drawing import DRAW_MODES, label_font, label_style, upscale_small, with_labels
from retinanet.ops.anchors import anchor_generator
from retinanet.ops.boxes import paired_iou
from retinanet.ops.resize import padded_size
from retinanet.runtime.outputs import save_figure, write_json
from retinanet.tools.anchor_coverage import LOW_QUALITY, NONE, POSITIVE, box_status, training_boxes

__all__ = ["dataset_statistics", "draw_inspection", "inspect_dataset", "plot_statistics", "summary_line"]

COLOURS = {POSITIVE: "#2ca02c", LOW_QUALITY: "#ff9f1a", NONE: "#e6194b"}
CROWD_COLOUR = "#9e9e9e"
ANCHOR_COLOURS = {POSITIVE: "#98df8a", LOW_QUALITY: "#ffd08a", NONE: "#ff9896"}
MAX_ANCHORS_DRAWN = 12  # per box: more hide the image


def _quantiles(values: Tensor) -> dict[str, float] | None:
    """min, p5, p25, median, p75, p95, max of a 1-D tensor (None when empty)."""
    if not values.numel():
        return None
    qs = torch.tensor([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64)
    got = torch.quantile(values.double(), qs).tolist()
    return {k: round(v, 3) for k, v in zip(("min", "p5", "p25", "median", "p75", "p95", "max"), got)}


def dataset_statistics(records: Sequence[Any], categories: Sequence[dict[str, Any]], cfg: ModelConfig) -> dict:
    """Statistics of a dataset's annotations (`DetectionDataset.records`; nothing is decoded), JSON-ready: images,
    empty images, boxes per image, per class the boxes and the images holding one, box sizes (sqrt of the area,
    width, height, in stored pixels and after resizing to model.min_size) and aspect ratios h / w."""
    per_image = torch.tensor([int((~r.iscrowd).sum()) for r in records], dtype=torch.float64)
    boxes = [r.boxes[~r.iscrowd] for r in records]
    labels = torch.cat([r.labels[~r.iscrowd] for r in records]) if records else torch.zeros(0, dtype=torch.int64)
    all_boxes = torch.cat(boxes) if boxes else torch.zeros(0, 4)
    wh = (all_boxes[:, 2:] - all_boxes[:, :2]).double()
    resized = training_boxes(records, cfg, sizes=(cfg.min_size,)).all_boxes().double()
    images_with = Counter(int(k) for r in records for k in set(r.labels[~r.iscrowd].tolist()))
    counts = Counter(labels.tolist())
    return {
        "images": len(records),
        "empty_images": int((per_image == 0).sum()),
        "boxes": int(per_image.sum()),
        "crowd_regions": sum(int(r.iscrowd.sum()) for r in records),
        "boxes_per_image": {
            "mean": round(float(per_image.mean()), 3) if records else None,
            **(_quantiles(per_image) or {}),
        },
        "classes": [
            {"label": k, "id": c["id"], "name": c["name"], "boxes": counts.get(k, 0), "images": images_with.get(k, 0)}
            for k, c in enumerate(categories)
        ],
        "box_size_px": _quantiles(wh.prod(1).sqrt()),
        "box_width_px": _quantiles(wh[:, 0]),
        "box_height_px": _quantiles(wh[:, 1]),
        "aspect_ratio_h_over_w": _quantiles(wh[:, 1] / wh[:, 0]),
        "box_size_px_after_resize": _quantiles((resized[:, 2:] - resized[:, :2]).prod(1).sqrt()),
        "resize": {"min_size": cfg.min_size, "max_size": cfg.max_size},
    }


def plot_statistics(
    records: Sequence[Any], categories: Sequence[dict[str, Any]], cfg: ModelConfig, path: str | Path
) -> Path:
    """A PNG of four histograms: boxes per image, boxes per class, box sizes (stored and resized), aspect ratios."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8))
    (ax_n, ax_cls), (ax_size, ax_ratio) = fig.subplots(2, 2)
    ax_n.hist([int((~r.iscrowd).sum()) for r in records], bins=30, color="#4363d8")
    ax_n.set_title("boxes per image")
    labels = torch.cat([r.labels[~r.iscrowd] for r in records]) if records else torch.zeros(0, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=len(categories)).tolist()
    ax_cls.bar([c["name"] for c in categories], counts, color="#3cb44b")
    ax_cls.set_title("boxes per class")
    ax_cls.tick_params(axis="x", labelrotation=60, labelsize=7)
    boxes = torch.cat([r.boxes[~r.iscrowd] for r in records]) if records else torch.zeros(0, 4)
    resized = training_boxes(records, cfg, sizes=(cfg.min_size,)).all_boxes()
    for b, name in ((boxes, "as stored"), (resized, f"resized (min_size {cfg.min_size})")):
        side = (b[:, 2:] - b[:, :2]).prod(1).sqrt()
        if side.numel():
            bins = torch.logspace(0, 11, 45, base=2).tolist()
            ax_size.hist(side.tolist(), bins=bins, alpha=0.6, label=name)
    ax_size.set_xscale("log", base=2)
    ax_size.set_title("box size sqrt(w h), px")
    ax_size.legend(fontsize=8)
    if boxes.numel():
        ax_ratio.hist(((boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0])).log2().tolist(), bins=40)
    ax_ratio.set_title("aspect ratio log2(h / w)")
    fig.tight_layout()
    return save_figure(fig, path)


def draw_inspection(
    image: Tensor,
    boxes: Tensor,
    status: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    best_iou: Tensor,
    crowd: Tensor | None = None,
    anchors_per_box: list[Tensor] | None = None,
    mode: str = "auto",
) -> Tensor:
    """The image with its boxes coloured by status; mode: with their labels ("labels"), boxes alone ("boxes"), or
        labels while they stay readable (retinanet.inference.drawing.labels_readable) and boxes alone in dense scenes
    ("auto").

        image: float [3, H, W] in [0, 1]; boxes [G, 4] XYXY pixels; status [G] (POSITIVE, LOW_QUALITY, NONE);
        labels [G]; best_iou [G]; crowd [C, 4] regions drawn grey; anchors_per_box: per box [M_g, 4] anchors drawn thin.
        Returns uint8 [3, H', W'] (small images are enlarged so that the labels stay legible)."""
    original_width = image.shape[-1]
    image, boxes = upscale_small(image.detach().cpu(), boxes.detach().cpu().float())
    up = image.shape[-1] // original_width  # the enlargement, for the crowd regions and anchors too
    img = (image.clamp(0, 1) * 255).to(torch.uint8)
    width = max(1, round(min(img.shape[-2:]) / 250))
    if anchors_per_box:
        drawn = [(a.float() * up, ANCHOR_COLOURS[int(s)]) for a, s in zip(anchors_per_box, status) if len(a)]
        if drawn:
            img = draw_bounding_boxes(
                img, torch.cat([a for a, _ in drawn]), width=1, colors=[c for a, c in drawn for _ in range(len(a))]
            )
    if crowd is not None and len(crowd):
        img = draw_bounding_boxes(img, crowd.float() * up, colors=CROWD_COLOUR, width=width)
    if len(boxes):
        text = [
            f"{_name(class_names, k)}" + ("" if s == POSITIVE else f" IoU {iou:.2f}")
            for k, s, iou in zip(labels.tolist(), status.tolist(), best_iou.tolist())
        ]
        colours = [COLOURS[int(s)] for s in status]
        side = float((boxes[:, 2:] - boxes[:, :2]).min(1).values.median())
        line = max(1, min(width + 1, round(side / 10)))  # lines thin enough not to hide small objects
        if with_labels(mode, boxes, text, tuple(img.shape[-2:])):
            img = draw_bounding_boxes(
                img,
                boxes,
                labels=text,
                colors=colours,
                width=line,
                font=label_font(),
                font_size=label_style(tuple(img.shape[-2:]))[0],
                label_colors="white",
                fill_labels=True,
            )
        else:
            img = draw_bounding_boxes(img, boxes, colors=colours, width=line)
    return img


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def _positive_anchors(found: Any, boxes: Tensor, fg_iou: float) -> list[Tensor]:
    """Per box [M, 4] the anchors the matcher gave it (at IoU >= fg_iou; the low-quality ones for a box that has
    none), at most MAX_ANCHORS_DRAWN, best first."""
    out = []
    gt = found.matches.clamp(min=0)
    iou = paired_iou(boxes[gt], found.anchors) if len(boxes) and len(found.anchors) else found.anchors.new_zeros(0)
    for g in range(len(boxes)):
        mine = (found.matches == g) & ((iou >= fg_iou) | (found.positive[g] == 0))
        order = iou[mine].argsort(descending=True)[:MAX_ANCHORS_DRAWN]
        out.append(found.anchors[mine][order])
    return out


def inspect_dataset(
    dataset: Any,
    cfg: ModelConfig,
    output: str | Path,
    show_anchors: bool = False,
    limit: int | None = 64,
    only_missed: bool = False,
    draw: str = "auto",
) -> dict[str, Any]:
    """Write the drawn images of `dataset` (with its transforms) and its statistics under `output`.

    limit: at most this many images drawn (None: all); only_missed: draw only images that have a box without a
    positive anchor; draw: how boxes are drawn (draw_inspection's mode). Returns {"statistics", "images": [{"file",
    "index", "size" (H, W as transformed), "boxes", "positive", "low_quality_only", "no_anchor"}], "boxes_by_status"}
    (also written as output/inspect.json)."""
    if draw not in DRAW_MODES:
        raise ValueError(f"inspect --draw {draw!r}: expected one of {list(DRAW_MODES)}")
    out = Path(output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for old in (out / "images").glob("[0-9][0-9][0-9][0-9][0-9]_*.png"):  # an earlier inspection's drawings
        old.unlink()
    stats = dataset_statistics(dataset.records, dataset.categories, cfg)
    plot_statistics(dataset.records, dataset.categories, cfg, out / "stats.png")
    write_json(out / "stats.json", stats)
    generator = anchor_generator(cfg)
    names = dataset.category_names
    written, totals = [], Counter()
    for index in range(len(dataset)):
        if limit is not None and len(written) >= limit:
            break
        row = _inspect_one(dataset, index, cfg, generator, names, out / "images", show_anchors, only_missed, draw)
        if row is not None:
            written.append(row)
            totals.update({k: row[k] for k in ("positive", "low_quality_only", "no_anchor")})
    result = {"statistics": stats, "images": written, "boxes_by_status": dict(totals)}
    write_json(out / "inspect.json", result)
    return result


def _inspect_one(
    dataset: Any,
    index: int,
    cfg: ModelConfig,
    generator: Any,
    names: Sequence[str],
    folder: Path,
    show_anchors: bool,
    only_missed: bool,
    draw: str = "auto",
) -> dict[str, Any] | None:
    image, target = dataset[index]
    image = image.as_subclass(Tensor)
    all_boxes = target["boxes"].as_subclass(Tensor).float()
    crowd = target["iscrowd"].as_subclass(Tensor).bool()
    boxes, labels = all_boxes[~crowd], target["labels"].as_subclass(Tensor)[~crowd]
    found = box_status(cfg, boxes, padded_size(tuple(image.shape[-2:]), cfg.size_divisible), generator)
    counts = {
        key: int((found.status == s).sum())
        for key, s in (("positive", POSITIVE), ("low_quality_only", LOW_QUALITY), ("no_anchor", NONE))
    }
    if only_missed and counts["positive"] == len(boxes):
        return None
    anchors = _positive_anchors(found, boxes, cfg.fg_iou) if show_anchors else None
    drawn = draw_inspection(image, boxes, found.status, labels, names, found.best_iou, all_boxes[crowd], anchors, draw)
    record = dataset.records[index]
    stem = record.path.stem if record.path is not None else f"image{record.image_id}"
    path = folder / f"{index:05d}_{stem}.png"
    Image.fromarray(drawn.permute(1, 2, 0).contiguous().numpy()).save(path)
    return {"file": str(path), "index": index, "size": list(image.shape[-2:]), "boxes": len(boxes), **counts}


def summary_line(result: dict[str, Any]) -> str:
    """What `retinanet inspect` prints of `inspect_dataset`'s result: the data's size and the drawn boxes' status."""
    stats, by_status = result["statistics"], result["boxes_by_status"]
    return (
        f"{stats['images']} images ({stats['empty_images']} empty), {stats['boxes']} boxes; drawn: "
        f"{len(result['images'])} images, boxes with a positive anchor {by_status.get('positive', 0)}, only "
        f"low-quality {by_status.get('low_quality_only', 0)}, none {by_status.get('no_anchor', 0)}"
    )
