"""Ablation grids: YAML files naming a table, its describing columns and one training run (cell) per row.

    table: a                                   # results go to DIR/a/<cell>/ and DIR/a.md (default: the file's stem)
    title: "Table 1a: balanced CE, varying alpha"
    columns: [alpha]                           # the describing columns, before AP, AP50, AP75 and seconds
    set: {model.cls_loss: balanced_ce}         # overrides of every cell (dotted keys, as `retinanet train --set`)
    report: [losses]                           # optional: loss columns (start, peak, end, blow-up, non-finite),
                                               # speed, or localisation (every validation set's AP, AP50, AP75
                                               # and the AP50 lost to badly placed boxes, and minutes)
    cells:
      - name: alpha_0.5                        # the cell's folder: letters, digits, '.', '_' and '-'
        values: {alpha: 0.5}                   # one entry per column
        set: {model.alpha: 0.5}
        row: gamma_2                           # optional: cells sharing a row show as one, the best AP among them

A cell's run config is the base config (file and command-line --set), then the grid's `set`, then the cell's.
The grids of the paper ship with the package (grids/*.yaml) and are found by name: `load_grid("a")`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from retinanet.config import RunConfig, run_config_from_dict

__all__ = ["Cell", "Grid", "load_grid", "shipped_grids", "shipped_file", "cell_config"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SECTIONS = ("model", "data", "train")
REPORTS = ("losses", "speed", "localisation")


@dataclass(frozen=True)
class Cell:
    """One training run of a grid: its folder name, its values in the table's columns, its overrides."""

    name: str
    values: dict[str, Any]
    overrides: dict[str, Any]  # dotted key -> value
    row: str  # cells with the same row are shown as one row: the best AP among them


@dataclass(frozen=True)
class Grid:
    table: str
    title: str
    columns: tuple[str, ...]
    overrides: dict[str, Any]
    cells: tuple[Cell, ...]
    report: tuple[str, ...] = ()
    source: str = ""  # where the grid came from (a path), for messages and the tables' footers
    text: str = field(default="", repr=False)  # the file's YAML, kept beside the results


def shipped_file(name: str) -> Path:
    """The path of a file shipped in retinanet/analysis/grids/ (e.g. "a.yaml", "base.yaml")."""
    return Path(str(resources.files("retinanet.analysis") / "grids" / name))


def shipped_grids() -> list[str]:
    """The names of the grids that ship with the package."""
    folder = shipped_file("")
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base")


def load_grid(name_or_path: str | Path) -> Grid:
    """A grid from a YAML file, or a shipped grid by name ("a", "b", "c", "d", "fl_star", "prior", ...)."""
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path) in shipped_grids():
            path = shipped_file(f"{name_or_path}.yaml")
        else:
            names = ", ".join(shipped_grids())
            raise ValueError(f"grid {str(name_or_path)!r}: no such file, nor a shipped grid ({names})")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return _grid(data, path, text)


def _grid(data: Any, path: Path, text: str) -> Grid:
    where = str(path)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with 'cells' (and table, title, columns, set, report)")
    unknown = sorted(set(data) - {"table", "title", "columns", "set", "report", "cells"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are cells, columns, report, set, table, title")
    table = str(data.get("table", path.stem))
    if not _NAME.match(table):
        raise ValueError(f"{where}: table name {table!r} must be letters, digits, '.', '_' or '-'")
    columns = tuple(str(c) for c in data.get("columns") or ())
    report = tuple(data.get("report") or ())
    if not set(report) <= set(REPORTS):
        raise ValueError(f"{where}: report {list(report)} must be a list of {list(REPORTS)}")
    cells_data = data.get("cells")
    if not isinstance(cells_data, list) or not cells_data:
        raise ValueError(f"{where}: 'cells' must be a non-empty list of cells")
    cells = tuple(_cell(c, i, columns, where) for i, c in enumerate(cells_data))
    names = [c.name for c in cells]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: cell names must be unique, repeated: {repeated}")
    overrides = _overrides(data.get("set"), f"{where}: set")
    return Grid(table, str(data.get("title", table)), columns, overrides, cells, report, where, text)


def _cell(data: Any, index: int, columns: tuple[str, ...], where: str) -> Cell:
    where = f"{where}: cell {index}"
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"{where}: expected a mapping with name, values and set")
    unknown = sorted(set(data) - {"name", "values", "set", "row"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are name, row, set, values")
    name = str(data["name"])
    if not _NAME.match(name):
        raise ValueError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    values = dict(data.get("values") or {})
    missing, extra = sorted(set(columns) - set(values)), sorted(set(values) - set(columns))
    if missing or extra:
        raise ValueError(
            f"{where} ({name}): values must give exactly the columns {list(columns)}; "
            f"missing {missing}, not a column {extra}"
        )
    return Cell(name, values, _overrides(data.get("set"), f"{where} ({name}): set"), str(data.get("row", name)))


def _overrides(data: Any, where: str) -> dict[str, Any]:
    """{dotted key: value}, each key 'section.key' with section model, data or train."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of section.key to value, e.g. {{model.gamma: 1.0}}")
    for key in data:
        section, dot, name = str(key).partition(".")
        if not dot or not name or section not in _SECTIONS:
            raise ValueError(f"{where}: key {key!r} must be section.key with section model, data or train")
    return {str(k): v for k, v in data.items()}


def _nested(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def cell_config(base: RunConfig, grid: Grid, cell: Cell) -> RunConfig:
    """The cell's run config: base, then the grid's overrides, then the cell's; errors name the grid and cell."""
    cfg = run_config_from_dict(_nested(grid.overrides), f"{grid.source}: set", base)
    return run_config_from_dict(_nested(cell.overrides), f"{grid.source}: cell {cell.name!r}", cfg)
