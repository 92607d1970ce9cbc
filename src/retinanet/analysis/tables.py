"""The ablation tables: markdown laid out as the paper's Tables 1 and 3, and one results.json of a whole folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from retinanet.analysis.grids import Cell, Grid

__all__ = ["render_table", "best_cells", "format_value", "collect_results", "set_names"]

METRICS = ("AP", "AP50", "AP75")


def format_value(value: Any) -> str:
    """A describing column's entry: numbers as the paper prints them (.25, 2, 1e-3), the rest as text."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        text = f"{value:g}"
        return text[1:] if text.startswith("0.") else text
    return str(value)


def _ap(result: dict[str, Any]) -> float:
    ap = result.get("metrics", {}).get("AP") if result.get("status") == "finished" else None
    return -math.inf if ap is None else ap


def best_cells(grid: Grid, results: dict[str, dict[str, Any]]) -> list[tuple[Cell, int]]:
    """Per row of the table (in the grid's order): the cell shown, the best AP among the row's finished cells
    (the first cell while none has finished), and how many cells the row has."""
    rows: dict[str, list[Cell]] = {}
    for cell in grid.cells:
        rows.setdefault(cell.row, []).append(cell)
    shown = []
    for cells in rows.values():
        done = [c for c in cells if c.name in results]
        best = max(done, key=lambda c: _ap(results[c.name])) if done else cells[0]
        shown.append((best, len(cells)))
    return shown


def _status_cells(result: dict[str, Any] | None, running: str | None) -> list[str]:
    """AP, AP50, AP75 and seconds of one cell, or what keeps them from existing yet."""
    if result is None:
        return [f"running ({running})" if running else "not run", "-", "-", "-"]
    seconds = f"{result['train_seconds']:.0f}" + (" †" if result.get("resumed_from") else "")
    if result["status"] != "finished":
        return [f"non-finite loss at iter {result.get('nonfinite_iteration', '?')}", "-", "-", seconds]
    metrics = result["metrics"]
    return ["-" if metrics.get(k) is None else f"{100 * metrics[k]:.1f}" for k in METRICS] + [seconds]


def _loss_cells(result: dict[str, Any] | None) -> list[str]:
    if result is None or not result.get("losses"):
        return ["-"] * 5
    losses = result["losses"]
    start, peak, end = losses["start"], losses["peak"], losses["end"]
    blow_up = losses.get("blow_up")
    return [
        f"{start[1]:.4g} (it {start[0]})",
        f"{peak[1]:.4g} (it {peak[0]})",
        f"{end[1]:.4g} (it {end[0]})",
        f"it {blow_up}" if blow_up else "no",
        f"it {result['nonfinite_iteration']}" if result.get("status") == "non-finite" else "no",
    ]


def set_names(results: dict[str, dict[str, Any]]) -> list[str]:
    """The validation sets the cells were evaluated on: "val" (the first), then data.extra_val's, by name."""
    extra = {k.split("/")[0] for r in results.values() for k in (r.get("metrics") or {}) if "/" in k}
    return ["val", *sorted(extra)]


def _localisation_cells(result: dict[str, Any] | None, sets: list[str]) -> list[str]:
    """Per validation set AP, AP50, AP75 and the AP50 lost to badly placed boxes (TIDE's loc), in %; then the
    training minutes."""
    metrics = (result or {}).get("metrics") or {}
    cells = []
    for name in sets:
        keys = [k if name == "val" else f"{name}/{k}" for k in (*METRICS, "dAP50_loc")]
        cells += ["-" if metrics.get(k) is None else f"{100 * metrics[k]:.1f}" for k in keys]
    minutes = f"{result['train_seconds'] / 60:.1f}" if result and result.get("train_seconds") else "-"
    return cells + [minutes]


def _speed_cells(result: dict[str, Any] | None) -> list[str]:
    if result is None or not result.get("val_images") or result.get("inference_seconds") is None:
        return ["-"]
    return [f"{1000 * result['inference_seconds'] / result['val_images']:.1f}"]


def render_table(
    grid: Grid, results: dict[str, dict[str, Any]], running: dict[str, str] | None = None, footer: str = ""
) -> str:
    """The grid's table in markdown: its columns, then AP, AP50, AP75 (COCO, in %) and training seconds, then
    the loss columns (report: losses) or inference ms per image (report: speed). results: cell name -> its
    result.json; running: cell name -> who runs it now."""
    running = running or {}
    sets = set_names(results)
    if "localisation" in grid.report:  # every validation set side by side, with the AP lost to badly placed boxes
        header = [*grid.columns, *(f"{m} ({name})" for name in sets for m in (*METRICS, "dAP50 loc")), "train min"]
    else:
        header = [*grid.columns, *METRICS, "train s"]
    if "losses" in grid.report:
        header += ["first loss", "peak loss", "last loss", "blow-up (10x)", "non-finite"]
    if "speed" in grid.report:
        header += ["inference ms / image"]
    lines = [
        f"## {grid.title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(":--" if i < len(grid.columns) else "--:" for i in range(len(header))) + "|",
    ]
    for cell, alternatives in best_cells(grid, results):
        result = results.get(cell.name)
        values = [format_value(cell.values[c]) for c in grid.columns]
        if alternatives > 1 and values:
            values[-1] += f" (best of {alternatives})"
        if "localisation" in grid.report and result is not None and result["status"] == "finished":
            row = values + _localisation_cells(result, sets)
        elif "localisation" in grid.report:
            row = values + _status_cells(result, running.get(cell.name))[:1] + ["-"] * (4 * len(sets))
        else:
            row = values + _status_cells(result, running.get(cell.name))
        if "losses" in grid.report:
            row += _loss_cells(result)
        if "speed" in grid.report:
            row += _speed_cells(result)
        lines.append("| " + " | ".join(row) + " |")
    if any(r.get("resumed_from") for r in results.values()):
        lines += ["", "† resumed after an interruption: the seconds cover the part after resuming."]
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


def collect_results(output: Path) -> dict[str, Any]:
    """{table: {"title", "grid", "cells": {cell: result}}} of every grid run under `output` (a folder with
    grid.yaml), for results.json."""
    out: dict[str, Any] = {}
    for grid_file in sorted(output.glob("*/grid.yaml")):
        table = grid_file.parent
        cells = {}
        for result in sorted(table.glob("*/result.json")):
            cells[result.parent.name] = json.loads(result.read_text(encoding="utf-8"))
        out[table.name] = {"grid": str(grid_file), "cells": cells}
    return out
