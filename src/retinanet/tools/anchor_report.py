"""The report of `retinanet anchors`: anchors.json (coverage overall, by size and aspect ratio, best IoUs; with
--fit the fitted layout, its coverage and the config overrides), anchors_fit.yaml and anchors.png."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from retinanet.config import ModelConfig, apply_overrides
from retinanet.ops.anchors import AnchorGenerator, anchor_generator
from retinanet.runtime.outputs import atomic_write, save_figure, write_json
from retinanet.tools.anchor_coverage import (
    LOW_QUALITY,
    NONE,
    POSITIVE,
    STATUS_NAMES,
    Coverage,
    coverage,
    training_boxes,
)
from retinanet.tools.anchor_fit import fit_anchors
from retinanet.tools.anchor_grid import anchor_shapes

__all__ = ["layout_summary", "plot_coverage", "summary_lines", "write_report"]


def layout_summary(cfg: ModelConfig) -> dict[str, Any]:
    """The anchors of a config, JSON-ready: sizes per level (P3 first), aspect ratios, A per location."""
    generator = anchor_generator(cfg)
    return {
        "sizes_per_level": [[round(s, 2) for s in sizes] for sizes in generator.sizes_per_level],
        "aspect_ratios": list(generator.aspect_ratios),
        "anchors_per_location": generator.num_anchors_per_location(),
    }


def write_report(
    records: Sequence[Any], cfg: ModelConfig, output: str | Path, fit: bool = False, max_anchors: int = 9
) -> dict[str, Any]:
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
        summary.update(
            fitted_coverage=fitted.value,
            overrides=overrides,
            fitted=fitted.summary(),
            fitted_anchors=layout_summary(fitted_cfg),
            search=result.tried,
        )
        generators["fitted"] = anchor_generator(fitted_cfg)
        out.mkdir(parents=True, exist_ok=True)
        header = (
            f"# retinanet anchors --fit: {_percent(found.value)} -> {_percent(fitted.value)} of the "
            f"{found.num_boxes} training boxes get an anchor at IoU >= {cfg.fg_iou:g}\n"
        )
        before, after = anchor_generator(cfg).num_anchors_per_location(), result.layout.num_anchors
        if before != after:
            header += (
                f"# anchors per location {before} -> {after}: a model started (model.init_from) from one with "
                f"{before} starts its final layers again\n"
            )
        text = yaml.safe_dump({"model": overrides}, sort_keys=False, default_flow_style=None)
        larger = fit_size(records, cfg, max_anchors) if fitted.value is not None and fitted.value < LEAST else None
        if larger is not None:
            summary["larger_size"] = larger
            text += (
                f"# objects too small for the anchor grid at this size: at {larger['factor']:g}x the image size "
                f"(about {larger['factor'] ** 2:.1f}x the compute) anchors fitted there cover "
                f"{_percent(larger['coverage'])}; in place of the above:\n"
            )
            dump = yaml.safe_dump({"model": larger["overrides"]}, sort_keys=False, default_flow_style=None)
            text += "".join(f"# {line}" for line in dump.splitlines(keepends=True))
        atomic_write(out / "anchors_fit.yaml", header + text)
    summary["seconds"] = round(time.perf_counter() - tic, 2)
    if found.num_boxes:
        plot_coverage(found, generators, out / "anchors.png")
    write_json(out / "anchors.json", summary)
    return summary


LEAST = 0.95  # a coverage below this is worth a larger image size
SIZE_FACTORS = (1.5, 2.0, 3.0, 4.0)


def fit_size(records: Sequence[Any], cfg: ModelConfig, max_anchors: int = 9) -> dict[str, Any] | None:
    """Where fitted anchors leave boxes uncovered because they are too small for the grid: the smallest of
    SIZE_FACTORS times the image size (model.min_size, max_size and train_min_sizes, to multiples of
    size_divisible) at which anchors fitted there cover LEAST of the boxes (or the best of them), as {"factor",
    "coverage", "overrides"}; None where no larger size gains a point of coverage."""
    best, start = None, coverage(training_boxes(records, cfg), cfg).value or 0.0
    d = cfg.size_divisible
    for factor in SIZE_FACTORS:
        sizes = {
            "min_size": d * round(cfg.min_size * factor / d),
            "max_size": d * round(cfg.max_size * factor / d),
            "train_min_sizes": [d * round(t * factor / d) for t in cfg.train_min_sizes],
        }
        larger = apply_overrides(cfg, sizes)
        boxes = training_boxes(records, larger)
        layout = fit_anchors(boxes, larger, max_anchors=max_anchors).layout
        value = coverage(boxes, layout.apply(larger)).value or 0.0
        if best is None or value > best["coverage"]:
            overrides = {k: v for k, v in sizes.items() if v or k != "train_min_sizes"} | layout.overrides(larger)
            best = {"factor": factor, "coverage": value, "overrides": overrides}
        if value >= LEAST:
            break
    return best if best is not None and best["coverage"] >= start + 0.01 else None


def summary_lines(summary: dict[str, Any], output: Path) -> list[str]:
    """What `retinanet anchors` prints of a `write_report` summary: the coverage overall and by bucket, and with
    --fit the fitted anchors as config overrides to paste."""
    lines = _coverage_lines("anchors", summary)
    if "fitted" in summary:
        lines += _coverage_lines("fitted", summary["fitted"])
        lines.append(f"the fitted anchors, to paste into the config (also {output / 'anchors_fit.yaml'}):")
        lines.append(yaml.safe_dump({"model": summary["overrides"]}, sort_keys=False, default_flow_style=None).rstrip())
    if "larger_size" in summary:
        larger = summary["larger_size"]
        lines.append(
            f"objects too small for the anchor grid at this size: at {larger['factor']:g}x the image size "
            f"(about {larger['factor'] ** 2:.1f}x the compute) anchors fitted there cover "
            f"{_percent(larger['coverage'])} (or train on tiles {larger['factor']:g}x smaller):"
        )
        lines.append(yaml.safe_dump({"model": larger["overrides"]}, sort_keys=False, default_flow_style=None).rstrip())
    lines.append(f"anchors.json and anchors.png in {output} ({summary['seconds']} s)")
    return lines


def _coverage_lines(name: str, summary: dict[str, Any]) -> list[str]:
    if not summary["boxes"]:
        return [f"{name}: no boxes"]
    lines = [
        f"{name}: {100 * summary['coverage']:.1f}% of {summary['boxes']} boxes have an anchor at IoU >= "
        f"{summary['fg_iou']:g}; {100 * summary['low_quality_only']:.1f}% only low-quality matches, "
        f"{100 * summary['no_anchor']:.1f}% none"
    ]
    for row in summary["by_size"] + summary["by_aspect_ratio"]:
        lines.append(
            f"  {row['bucket']:>12}: {row['boxes']:>7} boxes, {100 * row['coverage']:5.1f}% covered, "
            f"{100 * row['no_anchor']:5.1f}% none"
        )
    return lines


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# ------------------------------------------------------------------------------------------------------------------
# the picture


COLOURS = {POSITIVE: "#2ca02c", LOW_QUALITY: "#ff7f0e", NONE: "#d62728"}


def plot_coverage(
    found: Coverage, layouts: dict[str, AnchorGenerator], path: str | Path, max_points: int = 20000
) -> Path:
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
    return save_figure(fig, path)


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
        shapes = anchor_shapes(generator.sizes_per_level, generator.aspect_ratios).reshape(-1, 2)
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
