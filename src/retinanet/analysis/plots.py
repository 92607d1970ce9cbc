"""Line plots (PNG, headless) and tables (CSV, atomic text files) of the analysis tools."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from retinanet.runtime.outputs import save_figure

__all__ = ["Panel", "save_line_plot", "write_csv"]


@dataclass
class Panel:
    """One axes of a figure: lines by name, each (x values, y values) of equal length."""

    title: str
    x_label: str
    y_label: str
    lines: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    xlim: tuple[float, float] | None = None
    ylim: tuple[float, float] | None = None
    note: str = ""  # a line of text inside the axes (e.g. the counts behind the curves)


def save_line_plot(path: str | Path, panels: Sequence[Panel], width_per_panel: float = 5.0) -> Path:
    """Draw the panels side by side into a PNG at `path` (folders made as needed)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot state, no display needed

    fig = Figure(figsize=(width_per_panel * len(panels), 4.2), dpi=120)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for name, (x, y) in panel.lines.items():
            ax.plot(list(x), list(y), label=name, linewidth=1.6)
        ax.set(title=panel.title, xlabel=panel.x_label, ylabel=panel.y_label)
        if panel.xlim:
            ax.set_xlim(*panel.xlim)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        if panel.note:
            ax.text(0.02, 0.98, panel.note, transform=ax.transAxes, va="top", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path, dpi="figure")  # the figure's own 120 dpi


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """A CSV with a header row; floats written with repr precision (they round-trip)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path
