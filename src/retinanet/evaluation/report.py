"""An evaluation report to open in a browser: report/index.html, one self-contained page (no network, no CDN; its
thumbnails beside it in report/images/), and report/errors.json for scripts.

    retinanet eval --checkpoint runs/x/best.pt --config run.yaml --output runs/x/eval --report
    retinanet report --detections results.json --annotations instances_val.json --images val/ --output report/

The page shows the COCO metrics, per-class AP, the precision-recall curves, the error decomposition of
retinanet.evaluation.errors (counts and the AP each error type costs, overall, by size and by class) as a chart, and a
gallery of the images with the most errors, boxes coloured by their type: true positive, each false-positive type,
missed. A score threshold control updates the gallery and shows precision, recall and F1 at that threshold (at IoU
0.5: detections are matched by decreasing score, so dropping those below a threshold changes no match above it), and
the table gives each class's threshold of best F1. The gallery pages (24 images a page) and its thumbnails load
lazily, so that 5,000 images with 100,000 detections stay usable.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from retinanet.data.base import to_rgb
from retinanet.evaluation.coco import CocoMetrics, max_dets_for
from retinanet.evaluation.errors import ERROR_TYPES, ErrorAnalysis, analyze_errors
from retinanet.evaluation.report_page import SCRIPT, TEMPLATE
from retinanet.runtime.outputs import atomic_write, write_json

__all__ = ["COLOURS", "ReportImage", "best_f1_thresholds", "report_dataset", "write_report"]

COLOURS = {
    "tp": "#2ca02c",
    "cls": "#ff7f0e",
    "loc": "#e6c619",
    "both": "#9467bd",
    "dupe": "#1f77b4",
    "bkg": "#d62728",
    "missed": "#e377c2",
}
MEANING = {
    "tp": "a true positive",
    "cls": "the right place, the wrong class",
    "loc": "the right class, badly placed (IoU 0.1-0.5)",
    "both": "the wrong class and badly placed",
    "dupe": "a second detection of a found object",
    "bkg": "background taken for an object",
    "missed": "an object no detection found",
}
THUMBNAIL = 640  # the longer side of a gallery image, px


@dataclass
class ReportImage:
    """One evaluated image: its file (None for generated images, then `pixels`), size (H, W) and name."""

    name: str
    size_hw: tuple[int, int]
    path: Path | None = None
    pixels: Any = None  # uint8 [H, W, 3] numpy array, for images without a file


def best_f1_thresholds(scores: np.ndarray, tp: np.ndarray, labels: np.ndarray, num_gt: dict[int, int]) -> dict:
    """Per class the score threshold of best F1 at IoU 0.5, with its precision, recall and F1."""
    out = {}
    for c, n in num_gt.items():
        mine = labels == c
        order = np.argsort(-scores[mine], kind="stable")
        s, hits = scores[mine][order], tp[mine][order].astype(float)
        if not len(s) or n == 0:
            out[c] = {"threshold": None, "precision": 0.0, "recall": 0.0, "f1": 0.0}
            continue
        true = np.cumsum(hits)
        precision, recall = true / np.arange(1, len(s) + 1), true / n
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        k = int(np.argmax(f1))
        out[c] = {
            "threshold": float(s[k]),
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
        }
    return out


def write_report(
    output: str | Path,
    images: Sequence[ReportImage],
    ground_truth: Sequence[dict[str, Any]],
    detections: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    errors: ErrorAnalysis,
    metrics: CocoMetrics | None = None,
    pr_curves: Path | None = None,
    gallery: int = 1000,
) -> Path:
    """Write output/index.html, output/errors.json and the gallery's thumbnails (the `gallery` images with the
    most errors) in output/images/. ground_truth and detections: per image as
    `retinanet.evaluation.errors.analyze_errors` takes them, in the order of `images`. Returns the page's path."""
    out = Path(output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scores, tp, labels, num_gt = _scored(ground_truth, detections, errors)
    best = best_f1_thresholds(scores, tp, labels, num_gt)
    to_try = {k: text for k, _, text in what_to_try(errors)}
    found = {
        **errors.to_dict(class_names),
        "what_to_try": to_try,
        "best_f1": {class_names[c]: v for c, v in best.items()},
    }
    write_json(out / "errors.json", found)
    page = {
        "classes": list(class_names),
        "colours": COLOURS,
        "meaning": MEANING,
        "scores": [round(float(v), 4) for v in scores],
        "tp": tp.astype(int).tolist(),
        "labels": labels.tolist(),
        "num_gt": [num_gt.get(c, 0) for c in range(len(class_names))],
        "gallery": _gallery(out, images, ground_truth, detections, errors, gallery),
    }
    body = _page(page, class_names, errors, metrics, best, pr_curves)
    return atomic_write(out / "index.html", body)


def _scored(ground_truth: Sequence[dict], detections: Sequence[dict], errors: ErrorAnalysis):
    """Every scored detection (score, true positive at IoU 0.5, label) and the ground truth count per class (crowd
    regions and ignored detections left out)."""
    scores, tp, labels, num_gt = [], [], [], {}
    for gt, det, kinds in zip(ground_truth, detections, errors.detections):
        crowd = gt.get("iscrowd")
        for k, c in enumerate(gt["labels"].tolist()):
            if crowd is None or not bool(crowd[k]):
                num_gt[c] = num_gt.get(c, 0) + 1
        for s, c, kind in zip(det["scores"].tolist(), det["labels"].tolist(), kinds):
            if kind != "ignored":
                scores.append(s)
                tp.append(kind == "tp")
                labels.append(c)
    return np.array(scores, dtype=float), np.array(tp, dtype=bool), np.array(labels, dtype=int), num_gt


def _gallery(
    out: Path,
    images: Sequence[ReportImage],
    ground_truth: Sequence[dict],
    detections: Sequence[dict],
    errors: ErrorAnalysis,
    count: int,
) -> list[dict]:
    """The `count` images with the most errors (false positives and missed boxes), their thumbnails written, each
    with its boxes in thumbnail pixels: detections [x1, y1, x2, y2, score, label, type] and ground truth
    [x1, y1, x2, y2, label, type, score of its match or -1]."""

    def error_count(i: int) -> int:
        return sum(k not in ("tp", "ignored") for k in errors.detections[i]) + errors.ground_truth[i].count("missed")

    chosen = sorted(range(len(images)), key=lambda i: (-error_count(i), i))[:count]
    cards = []
    for rank, i in enumerate(chosen):
        image, gt, det = images[i], ground_truth[i], detections[i]
        scale = min(1.0, THUMBNAIL / max(image.size_hw))
        name = f"{rank:05d}.jpg"
        _thumbnail(image, scale).save(out / "images" / name, quality=85)
        s = lambda v: round(float(v) * scale, 1)  # noqa: E731
        dets = [
            [s(b[0]), s(b[1]), s(b[2]), s(b[3]), round(float(sc), 3), int(c), k]
            for b, sc, c, k in zip(
                det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), errors.detections[i]
            )
            if k != "ignored"
        ]
        matched_scores = det["scores"].tolist()
        gts = [
            [s(b[0]), s(b[1]), s(b[2]), s(b[3]), int(c), k, round(matched_scores[m], 3) if m is not None else -1]
            for b, c, k, m in zip(
                gt["boxes"].tolist(), gt["labels"].tolist(), errors.ground_truth[i], errors.matches[i]
            )
            if k != "crowd"
        ]
        cards.append(
            {
                "name": image.name,
                "file": f"images/{name}",
                "w": round(image.size_hw[1] * scale),
                "h": round(image.size_hw[0] * scale),
                "errors": error_count(i),
                "dets": dets,
                "gts": gts,
            }
        )
    return cards


def _thumbnail(image: ReportImage, scale: float) -> Image.Image:
    if image.path is not None:
        with Image.open(image.path) as im:
            picture = Image.fromarray(to_rgb(im))
    else:
        picture = Image.fromarray(np.asarray(image.pixels, dtype=np.uint8))
    if scale < 1:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
    return picture


def report_dataset(
    output: str | Path,
    dataset: Any,
    ground_truth: Sequence[dict[str, Any]],
    detections: Sequence[dict[str, Any]],
    metrics: CocoMetrics | None = None,
    pr_curves: Path | None = None,
    errors: ErrorAnalysis | None = None,
) -> Path:
    """The report of a model's detections on a dataset (as `predict_dataset` gives them, in the dataset's order);
    errors: their decomposition when already made."""
    images = []
    for i, (record, gt) in enumerate(zip(dataset.records, ground_truth)):
        size = (int(gt["height"]), int(gt["width"]))
        name = record.path.name if record.path is not None else f"image {record.image_id}"
        pixels = None if record.path is not None else np.asarray(dataset.load_image(i))
        images.append(ReportImage(name, size, record.path, pixels))
    errors = errors or analyze_errors(ground_truth, detections, max_dets=max_dets_for(ground_truth))
    return write_report(output, images, ground_truth, detections, dataset.category_names, errors, metrics, pr_curves)


# ------------------------------------------------------------------------------------------------------------------
def _number(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _error_chart(errors: ErrorAnalysis) -> str:
    """An inline SVG bar chart: per error type its dAP at IoU 0.5 (bar) and its count."""
    width, bar_h, left = 560, 26, 190
    top = max([errors.dap[k]["50"] for k in ERROR_TYPES] + [1e-6])
    rows = []
    for j, k in enumerate(ERROR_TYPES):
        y = 10 + j * (bar_h + 8)
        w = (width - left - 110) * errors.dap[k]["50"] / top
        rows.append(
            f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{k} ({errors.counts[k]})</text>'
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLOURS[k]}"/>'
            f'<text x="{left + w + 6:.1f}" y="{y + 17}">{_number(errors.dap[k]["50"])} AP50</text>'
        )
    height = 20 + len(ERROR_TYPES) * (bar_h + 8)
    return (
        f'<svg id="error-chart" width="{width}" height="{height}" font-size="13" font-family="sans-serif" '
        f'role="img" aria-label="AP lost to each error type">{"".join(rows)}</svg>'
    )


# what to try against each error type, with the config keys and commands that do it
LEVERS = {
    "loc": "boxes in the right place but badly fitted: IoU-aware classification (model.cls_loss: quality_focal or "
    "varifocal), an IoU box loss (model.box_loss: giou, diou or ciou), ATSS assignment (model.assigner: atss), "
    "test-time augmentation (eval and detect --tta flips)",
    "missed": "objects not found: anchors that fit them (retinanet anchors --fit), a lower model.score_thresh, tiles "
    "for large images (detect --tile), a larger input size (model.min_size) for small objects",
    "bkg": "background taken for objects: more augmentation (data.augment: top_down, data.hue, data.scale_jitter), "
    "more training images without objects, a moving average of the weights (train.ema_decay)",
    "cls": "the right place, the wrong class: more training images of the confused classes, longer training",
    "dupe": "several boxes on one object: a lower NMS threshold (model.nms_thresh)",
    "both": "the wrong class and a badly fitted box: the levers of loc and of cls",
}
COSTLY = 0.01  # an error type that costs at least this much AP50 gets its line of what to try


def what_to_try(errors: ErrorAnalysis) -> list[tuple[str, float, str]]:
    """(error type, the AP50 it costs, what to try) for each type costing at least COSTLY, costliest first."""
    costly = sorted(((errors.dap[k]["50"], k) for k in ERROR_TYPES if errors.dap[k]["50"] >= COSTLY), reverse=True)
    return [(k, cost, LEVERS[k]) for cost, k in costly]


def _advice(errors: ErrorAnalysis) -> str:
    items = "".join(
        f"<li><b>{k}</b> (costs {cost:.3f} AP50): {html.escape(text)}</li>" for k, cost, text in what_to_try(errors)
    )
    if not items:
        return f'<p id="what-to-try">No error type costs {COSTLY:.2f} AP50 or more.</p>'
    return f'<h3>What to try</h3><ul id="what-to-try">{items}</ul>'


def _tables(class_names: Sequence[str], errors: ErrorAnalysis, metrics: CocoMetrics | None, best: dict) -> str:
    parts = []
    if metrics is not None:
        head = "".join(f"<th>{n}</th>" for n in metrics.STAT_NAMES)
        cells = "".join(f"<td>{_number(v)}</td>" for v in metrics.stats)
        parts.append(f'<h2>COCO metrics</h2><table id="coco"><tr>{head}</tr><tr>{cells}</tr></table>')
    rows = []
    for c, name in enumerate(class_names):
        ap = metrics.per_class_ap.get(name) if metrics is not None else None
        b = best.get(c, {})
        dap = errors.per_class.get(c, {}).get("dap", {})
        worst = max(dap, key=dap.get) if dap and max(dap.values()) > 0 else "-"
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{_number(ap)}</td>"
            f"<td>{_number(errors.per_class.get(c, {}).get('ap50'))}</td>"
            f"<td>{_number(b.get('threshold'))}</td><td>{_number(b.get('f1'))}</td>"
            f'<td class="pr" data-class="{c}">-</td><td>{worst}</td></tr>'
        )
    parts.append(
        '<h2>Per class</h2><table id="classes"><tr><th>class</th><th>AP</th><th>AP50 (TIDE)</th>'
        "<th>best-F1 threshold</th><th>best F1</th><th>P / R / F1 at the threshold</th>"
        f"<th>costliest error</th></tr>{''.join(rows)}</table>"
    )
    size_rows = "".join(
        f"<tr><td>{s}</td><td>{_number(v['ap50'])}</td>"
        + "".join(f"<td>{_number(v['dap'][k])}</td>" for k in ERROR_TYPES)
        + "</tr>"
        for s, v in errors.per_size.items()
    )
    parts.append(
        "<h2>By object size</h2><table><tr><th>size</th><th>AP50</th>"
        + "".join(f"<th>dAP {k}</th>" for k in ERROR_TYPES)
        + f"</tr>{size_rows}</table>"
    )
    return "".join(parts)


def _page(
    data: dict,
    class_names: Sequence[str],
    errors: ErrorAnalysis,
    metrics: CocoMetrics | None,
    best: dict,
    pr_curves: Path | None,
) -> str:
    curves = ""
    if pr_curves is not None and Path(pr_curves).exists():
        encoded = base64.b64encode(Path(pr_curves).read_bytes()).decode()
        curves = f'<h2>Precision-recall curves</h2><img id="pr" alt="PR curves" src="data:image/png;base64,{encoded}">'
    legend = "".join(
        f'<span class="key"><i style="background:{c}"></i>{k}: {MEANING[k]}</span>' for k, c in COLOURS.items()
    )
    dap = " ".join(f"{k} {_number(errors.dap[k]['avg'])}" for k in ERROR_TYPES)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return TEMPLATE.format(
        ap50=_number(errors.ap["50"]),
        apavg=_number(errors.ap["avg"]),
        chart=_error_chart(errors) + _advice(errors),
        dap_avg=dap,
        tables=_tables(class_names, errors, metrics, best),
        curves=curves,
        legend=legend,
        data=payload,
        script=SCRIPT,
    )
