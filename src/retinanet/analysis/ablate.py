"""`retinanet ablate`: a grid of training runs, one budget per cell, written as the paper's ablation tables.

What a grid leaves in its output folder DIR:
    DIR/<table>/grid.yaml             the grid as run
    DIR/<table>/<cell>/               the cell's run folder (config.yaml, log.jsonl, last.pt, train.log, tb/)
    DIR/<table>/<cell>/plan.json      the cell's config, so that only the same run is resumed or skipped
    DIR/<table>/<cell>/result.json    written atomically when the cell is done; a done cell is never run again
    DIR/<table>/<cell>.lock           while a process runs the cell (retinanet.analysis.locks)
    DIR/<table>.md, DIR/results.json  the tables and every cell's result, rewritten after each cell

A cell is done when its training finished and was evaluated (AP, AP50, AP75 on the validation set, training
seconds) or when its loss went non-finite (NonFiniteLossError: recorded as the cell's result, the grid goes on).
A cell whose run is that of a finished cell of another grid in DIR (FL with gamma 2, alpha .25 is in Tables 1b,
1d and 3) takes that cell's result instead of training again (its result.json says `same_run_as`).
A cell interrupted (Ctrl-C, a killed process) resumes from its own last.pt when the grid is run again.

Several processes share a grid by claiming cells with lock files: start the command several times (on one GPU or
CPU), or under torchrun, where each rank trains its own cells alone (not DDP: the torchrun variables are removed
before training) on GPU LOCAL_RANK, starting at its own place in the list.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from retinanet.analysis.grids import Cell, Grid, cell_config
from retinanet.analysis.locks import claim, mutex, read_lock
from retinanet.analysis.tables import collect_results, render_table
from retinanet.config import RunConfig, apply_overrides
from retinanet.data.build import FIRST_VAL, build_dataset, val_datasets
from retinanet.evaluation import evaluate_coco, max_dets_for
from retinanet.evaluation.dataset import predict_dataset
from retinanet.evaluation.errors import ERROR_TYPES, analyze_errors
from retinanet.evaluation.validation import validate
from retinanet.inference.predictor import categories_of
from retinanet.runtime.machine import set_threads
from retinanet.runtime.outputs import atomic_write
from retinanet.train.distributed import launched_slot
from retinanet.train.loop import NonFiniteLossError
from retinanet.train.run import run_train

__all__ = ["PlannedCell", "plan_grid", "run_grids", "run_cell", "loss_history", "BLOW_UP_FACTOR"]

BLOW_UP_FACTOR = 10.0  # a logged loss this many times above the lowest one before it is a blow-up
_VOLATILE = {("train", "output_dir"), ("train", "device"), ("train", "num_workers")}  # may differ between reruns


@dataclass(frozen=True)
class PlannedCell:
    grid: Grid
    cell: Cell
    config: RunConfig

    @property
    def folder(self) -> Path:
        return Path(self.config.train.output_dir)

    @property
    def label(self) -> str:
        return f"{self.grid.table}/{self.cell.name}"

    def plan(self) -> dict[str, Any]:
        """The config that defines the run (without its folder, device and worker count)."""
        data = self.config.to_dict()
        for section, key in _VOLATILE:
            data[section].pop(key, None)
        return json.loads(json.dumps(data))  # tuples as lists, as read back from plan.json


def plan_grid(grid: Grid, base: RunConfig, output: Path, minutes: float | None = None) -> list[PlannedCell]:
    """Every cell's run config (all checked before anything runs), its folder DIR/<table>/<cell>. minutes: every
    cell trains for this long (train.minutes, over what the grid and the cell set): levers compared at equal time."""
    planned = []
    for cell in grid.cells:
        cfg = cell_config(base, grid, cell)
        folder = output / grid.table / cell.name
        fixed = {"output_dir": str(folder)} | ({"minutes": minutes} if minutes is not None else {})
        cfg.train = apply_overrides(cfg.train, fixed, f"{grid.source}: cell {cell.name!r}")
        planned.append(PlannedCell(grid, cell, cfg))
    return planned


# --------------------------------------------------------------------------------------------------------------
def loss_history(log_path: Path) -> dict[str, Any] | None:
    """From a run's log.jsonl: the first, highest and last logged total loss as [iteration, value], and the first
    iteration whose loss is BLOW_UP_FACTOR times the lowest logged before it (None if none)."""
    if not log_path.is_file():
        return None
    points = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "loss" in entry:
            points.append((int(entry["iter"]), float(entry["loss"])))
    if not points:
        return None
    peak = max(points, key=lambda p: p[1])
    lowest, blow_up = points[0][1], None
    for it, value in points[1:]:
        if blow_up is None and value > BLOW_UP_FACTOR * lowest:
            blow_up = it
        lowest = min(lowest, value)
    return {"start": list(points[0]), "peak": list(peak), "end": list(points[-1]), "blow_up": blow_up}


def _resume_point(planned: PlannedCell) -> Path | None:
    """The cell's own last.pt when it was written by this same plan; otherwise a fresh start (the old one goes)."""
    last, plan_file = planned.folder / "last.pt", planned.folder / "plan.json"
    same = plan_file.is_file() and not _differences(json.loads(plan_file.read_text(encoding="utf-8")), planned.plan())
    if last.is_file() and same:
        return last
    last.unlink(missing_ok=True)
    atomic_write(plan_file, json.dumps(planned.plan(), indent=1))
    return None


def run_cell(planned: PlannedCell) -> dict[str, Any]:
    """Train the cell (resuming its own checkpoint if any), evaluate it, and return its result (not yet saved)."""
    cfg, folder = planned.config, planned.folder
    resume = _resume_point(planned)
    result: dict[str, Any] = {
        "table": planned.grid.table,
        "cell": planned.cell.name,
        "row": planned.cell.row,
        "values": planned.cell.values,
        "overrides": {**planned.grid.overrides, **planned.cell.overrides},
        "resumed_from": str(resume) if resume else None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    start = time.perf_counter()
    try:
        trained = run_train(copy.deepcopy(cfg), resume=resume, evaluate=False)  # it fills in the categories
    except NonFiniteLossError as exc:
        found = re.search(r"at iteration (\d+)", str(exc))
        result |= {
            "status": "non-finite",
            "message": str(exc),
            "train_seconds": time.perf_counter() - start,
            "nonfinite_iteration": int(found.group(1)) if found else None,
        }
    else:
        result |= {"status": "finished", "train_seconds": trained["train_seconds"], "iterations": trained["iteration"]}
        result |= _evaluate(trained["model"], cfg, trained["fast_paths"].amp)
        del trained
    result["losses"] = loss_history(folder / "log.jsonl")
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["config"] = planned.plan()
    gc.collect()
    return result


def _evaluate(model, cfg: RunConfig, amp: str) -> dict[str, Any]:
    """COCO metrics and the AP50 each error type costs on the validation sets in the run's precision (the first
    set's keys plain, data.extra_val's after their names: retinanet.evaluation.validation), and the inference time on
    the first set (detections only, not the evaluation)."""
    sets = val_datasets(cfg.data, model.config, categories_of(model))
    val = sets.pop(FIRST_VAL)
    start = time.perf_counter()
    gts, dets = predict_dataset(model, val, amp=amp)
    seconds = time.perf_counter() - start
    metrics = evaluate_coco(gts, dets, val.categories, max_dets=max_dets_for(gts))
    keep = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    errors = analyze_errors(gts, dets, max_dets=max_dets_for(gts))
    values = {k: float(getattr(metrics, k)) for k in keep} | {f"dAP50_{k}": errors.dap[k]["50"] for k in ERROR_TYPES}
    values |= validate(model, sets, amp=amp)
    values = {k: None if math.isnan(v) else v for k, v in values.items()}  # undefined (no such objects): null
    return {"metrics": values, "inference_seconds": seconds, "val_images": len(val)}


# --------------------------------------------------------------------------------------------------------------
def _process_slot() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun, else (0, 1, 0). Under torchrun the variables that would
    make run_train join a process group are removed: each rank trains its cells alone."""
    return launched_slot(forget=True) or (0, 1, 0)


def _on_own_gpu(planned: PlannedCell, local_rank: int) -> PlannedCell:
    """Under torchrun with GPUs, rank r trains on GPU LOCAL_RANK (modulo the GPUs there are)."""
    if planned.config.train.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return planned
    device = f"cuda:{local_rank % torch.cuda.device_count()}"
    planned.config.train = apply_overrides(planned.config.train, {"device": device}, "torchrun rank")
    return planned


def _done(planned: PlannedCell) -> bool:
    """Whether the cell has a result; a result of another plan is an error (new --output, or delete the cell)."""
    path = planned.folder / "result.json"
    if not path.is_file():
        return False
    recorded = json.loads(path.read_text(encoding="utf-8")).get("config") or {}
    differ = _differences(recorded, planned.plan())
    if differ:
        raise ValueError(
            f"{planned.folder}: this cell was finished with another config (differs in {differ}); "
            "use another --output, or delete the cell's folder to run it again"
        )
    return True


def _differences(a: dict, b: dict) -> list[str]:
    """The section.key settings that two plans give different values. A key only one of them has is not a
    difference: code that added a setting (with a default that keeps the old behaviour) does not void the cells
    run before it."""
    return sorted(f"{s}.{k}" for s in set(a) & set(b) for k in set(a[s]) & set(b[s]) if a[s][k] != b[s][k])


def _finished_twin(planned: PlannedCell) -> Path | None:
    """The result.json of a finished cell of any grid in the same output folder whose run is this cell's (the
    same config in every setting; runs are functions of their config and seed), else None."""
    mine = planned.plan()
    for path in sorted(planned.folder.parent.parent.glob("*/*/result.json")):
        if path.parent == planned.folder:
            continue
        if json.loads(path.read_text(encoding="utf-8")).get("config") == mine:  # every section, every key
            return path
    return None


def _reuse(planned: PlannedCell, twin: Path) -> None:
    """Record the twin's result as this cell's, saying where it came from (its run folder holds the checkpoint)."""
    result = json.loads(twin.read_text(encoding="utf-8"))
    result["same_run_as"] = f"{twin.parent.parent.name}/{twin.parent.name}"
    planned.folder.mkdir(parents=True, exist_ok=True)
    atomic_write(planned.folder / "plan.json", json.dumps(planned.plan(), indent=1))
    atomic_write(planned.folder / "result.json", json.dumps(result, indent=1, default=str))
    print(
        f"ablate: {planned.label}: the same run as {result['same_run_as']}, which is done: its result reused",
        flush=True,
    )


def _run_if_free(planned: PlannedCell) -> str:
    """Run the cell unless it is done, the same run as a finished cell of another grid (whose result it takes),
    or held by another live process: "done", "held" or "ran"."""
    if _done(planned):
        return "done"
    lock = claim(planned.folder.parent / f"{planned.cell.name}.lock")
    if lock is None:
        return "held"
    with lock:
        if _done(planned):  # finished by another process between the check and the claim
            return "done"
        twin = _finished_twin(planned)
        if twin is not None:
            _reuse(planned, twin)
            return "done"
        print(f"ablate: running {planned.label}", flush=True)
        result = run_cell(planned)
        atomic_write(planned.folder / "result.json", json.dumps(result, indent=1, default=str))
    print(f"ablate: {planned.label}: {_one_line(result)}", flush=True)
    return "ran"


def _one_line(result: dict[str, Any]) -> str:
    if result["status"] != "finished":
        return f"non-finite loss at iteration {result.get('nonfinite_iteration')}"
    ap = result["metrics"].get("AP")
    ap_text = f"AP {100 * ap:.1f}" if ap is not None else "AP undefined"
    return f"{ap_text}, {result['train_seconds']:.0f} s training"


def write_tables(grids: Sequence[Grid], output: Path, footer: str = "") -> list[Path]:
    """DIR/<table>.md for each grid (finished, running and pending cells) and DIR/results.json. Under a mutex:
    a process that read the results before another's cell finished must not write its older tables last."""
    with mutex(output / ".tables.lock", timeout=60.0):
        return _write_tables(grids, output, footer)


def _write_tables(grids: Sequence[Grid], output: Path, footer: str) -> list[Path]:
    files = []
    everything = collect_results(output)
    for grid in grids:
        results = everything.get(grid.table, {}).get("cells", {})
        running = {}
        for cell in grid.cells:
            info = read_lock(output / grid.table / f"{cell.name}.lock")
            if info is not None and cell.name not in results:
                running[cell.name] = f"{info.get('host', '?')} pid {info.get('pid', '?')}"
        text = render_table(grid, results, running, footer)
        files.append(atomic_write(output / f"{grid.table}.md", text))
    files.append(atomic_write(output / "results.json", json.dumps(everything, indent=1, default=str)))
    return files


def _footer(planned: Sequence[PlannedCell], base_source: str, command: str | None) -> str:
    cfg = planned[0].config
    t = cfg.train
    length = f"{t.max_iters} iterations" if t.minutes is None else f"{t.minutes:g} minutes of training in iterations"
    lines = [
        f"Each cell: the base config `{base_source}` with the cell's overrides; {length} of "
        f"{t.batch_size} images ({cfg.preset}, {cfg.model.min_size} px). AP, AP50, AP75: COCO box AP in % on "
        "the validation set; dAP50 loc: the AP50 lost to badly placed boxes (TIDE's oracle); train s (min): "
        "wall-clock time of training (evaluation excluded)."
    ]
    if command:
        lines.append(f"Command: `{command}`")
    return "\n".join(lines)


def run_grids(
    grids: Sequence[Grid],
    base: RunConfig,
    output: str | Path,
    base_source: str = "defaults",
    command: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
    minutes: float | None = None,
) -> dict[str, list[str]]:
    """Run every cell of `grids` (or those named in `only`) not yet done and not held by another process, then
    write the tables.

    Returns {"ran": [...], "done": [...], "held": [...]} (table/cell labels). Every cell's config is checked, and
    the validation set built once, before any cell trains; a cell's error other than a non-finite loss stops the
    grid (its lock is released; run again to go on). minutes: every cell trains for this long (equal time)."""
    output = Path(output)
    set_threads()  # torchrun's ranks (or OMP_NUM_THREADS) share the cores: none oversubscribes them
    rank, world, local_rank = _process_slot()
    planned = [_on_own_gpu(p, local_rank) for g in grids for p in plan_grid(g, base, output, minutes)]
    unknown = sorted(set(only or ()) - {p.cell.name for p in planned})
    if unknown:
        raise ValueError(f"ablate: no cell named {unknown} in the grids {[g.table for g in grids]}")
    footer = _footer(planned, base_source, shlex.join(command) if command else None)
    planned = [p for p in planned if not only or p.cell.name in only]
    build_dataset(base.data, base.model, "val", train_mode=False)  # a grid without a validation set stops here
    val_datasets(base.data, base.model, None)  # and one whose data.extra_val names a missing file
    for grid in grids:
        atomic_write(output / grid.table / "grid.yaml", grid.text)
    for p in planned:
        _done(p)  # a cell finished under another config stops the grid here, before anything trains
    start = (rank * len(planned)) // max(world, 1)  # ranks start at different cells, then take what is free
    outcome: dict[str, list[str]] = {"ran": [], "done": [], "held": []}
    try:
        for p in planned[start:] + planned[:start]:
            what = _run_if_free(p)
            outcome[what].append(p.label)
            if what == "ran":
                write_tables(grids, output, footer)
    finally:
        write_tables(grids, output, footer)
    return outcome
