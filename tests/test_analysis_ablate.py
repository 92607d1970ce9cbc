"""Ablation grids: shipped grids load, cells run once and are skipped when done, locks are shared and broken only
when stale, a non-finite loss is a cell's result, tables are laid out as the paper's."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_run_config

from retinanet.analysis import ablate, locks
from retinanet.analysis.ablate import loss_history, plan_grid, run_grids
from retinanet.analysis.grids import cell_config, load_grid, shipped_file, shipped_grids
from retinanet.analysis.tables import format_value, render_table
from retinanet.config import load_run_config
from retinanet.train.loop import NonFiniteLossError

TINY = {
    "data": {"synthetic_train_images": 4, "synthetic_val_images": 2},
    "train": {"max_iters": 2, "warmup_iters": 0},
}  # two iterations a cell

GRID = {
    "table": "t",
    "title": "Table T: alpha",
    "columns": ["alpha"],
    "set": {"model.cls_loss": "balanced_ce"},
    "cells": [{"name": f"alpha_{a}", "values": {"alpha": a}, "set": {"model.alpha": a}} for a in (0.5, 0.75)],
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def setup(tmp_path):
    base = write_run_config(tmp_path / "base.yaml", **TINY)
    grid = _write(tmp_path / "grid.yaml", GRID)
    return load_run_config(base), load_grid(grid), tmp_path / "out"


def test_shipped_grids_load_and_build_every_cell_on_the_shipped_base():
    assert {"a", "b", "b_alpha", "c", "d", "e", "fl_star", "prior"} <= set(shipped_grids())
    base = load_run_config(shipped_file("base.yaml"))
    sizes = {}
    for name in shipped_grids():
        grid = load_grid(name)
        configs = [cell_config(base, grid, c) for c in grid.cells]
        sizes[name] = len(configs)
        assert len({json.dumps(c.to_dict(), sort_keys=True) for c in configs}) == len(configs), name  # all differ
    assert (sizes["a"], sizes["b"], sizes["b_alpha"], sizes["c"], sizes["d"], sizes["fl_star"]) == (5, 7, 21, 6, 5, 4)
    cells = {c.name: cell_config(base, load_grid("a"), c) for c in load_grid("a").cells}
    assert cells["alpha_0.999"].model.alpha == 0.999 and cells["alpha_0.999"].model.cls_loss == "balanced_ce"
    prior = {c.name: cell_config(base, load_grid("prior"), c) for c in load_grid("prior").cells}
    assert prior["ce_no_prior"].model.prior_prob == 0.5 and prior["ce_prior"].model.prior_prob == 0.01
    d = {c.name: cell_config(base, load_grid("d"), c) for c in load_grid("d").cells}
    assert d["ohem_1to3_512"].model.ohem_neg_pos_ratio == 3.0 and d["ohem_512"].model.ohem_budget == 512


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colums": []}, "unknown key"),
        ({"cells": [{"name": "x", "values": {}}]}, r"values must give exactly the columns \['alpha'\]; missing"),
        ({"cells": [{"name": "x/y", "values": {"alpha": 1}}]}, "names a folder"),
        ({"cells": GRID["cells"] + GRID["cells"][:1]}, "repeated"),
        ({"set": {"alpha": 0.5}}, "must be section.key"),
    ],
)
def test_bad_grids_are_named_errors(tmp_path, change, message):
    path = _write(tmp_path / "bad.yaml", {**GRID, **change})
    with pytest.raises(ValueError, match=message) as info:
        load_grid(path)
    assert str(path) in str(info.value)


def test_a_bad_override_stops_before_anything_runs(setup):
    base, grid, out = setup
    cells = [{"name": "x", "values": {"alpha": 1}, "set": {"model.alpah": 1}}]
    bad = _write(out.parent / "bad.yaml", {**GRID, "cells": cells})
    with pytest.raises(ValueError, match=r"bad.yaml: cell 'x': model: unknown key\(s\) \['alpah'\]"):
        run_grids([load_grid(bad)], base, out)
    assert not (out / "t" / "x").exists()


@pytest.mark.slow
def test_grid_runs_each_cell_once_and_resume_skips_finished_cells(setup, capsys):
    base, grid, out = setup
    outcome = run_grids([grid], base, out, "base.yaml", ["retinanet", "ablate"])
    assert outcome == {"ran": ["t/alpha_0.5", "t/alpha_0.75"], "done": [], "held": []}
    result = json.loads((out / "t" / "alpha_0.5" / "result.json").read_text())
    assert result["status"] == "finished" and result["iterations"] == 2 and result["values"] == {"alpha": 0.5}
    assert set(result["metrics"]) >= {"AP", "AP50", "AP75"} and result["train_seconds"] > 0
    assert result["losses"]["start"][0] == 1 and result["losses"]["end"][0] == 2
    assert result["config"]["model"]["alpha"] == 0.5 and result["config"]["model"]["cls_loss"] == "balanced_ce"
    table = (out / "t.md").read_text().splitlines()
    assert table[0] == "## Table T: alpha" and table[2] == "| alpha | AP | AP50 | AP75 | train s |"
    assert table[4].startswith("| .5 | ") and table[5].startswith("| .75 | ") and "not run" not in "\n".join(table)
    assert set(json.loads((out / "results.json").read_text())["t"]["cells"]) == {"alpha_0.5", "alpha_0.75"}

    stamp = (out / "t" / "alpha_0.5" / "result.json").stat().st_mtime_ns
    assert run_grids([grid], base, out) == {"ran": [], "done": ["t/alpha_0.5", "t/alpha_0.75"], "held": []}
    assert (out / "t" / "alpha_0.5" / "result.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.count("ablate: running") == 2

    other = load_run_config(out.parent / "base.yaml", ["train.max_iters=3"])
    with pytest.raises(
        ValueError,
        match=r"alpha_0.5: this cell was finished with another config \(differs in "
        r"\['train.max_iters'\]\)",
    ):
        run_grids([grid], other, out)


def test_a_non_finite_loss_is_the_cells_result_and_the_grid_goes_on(setup, monkeypatch):
    base, grid, out = setup
    trained = []

    def fake_train(cfg, resume=None, evaluate=True):
        trained.append(cfg.model.alpha)
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.output_dir) / "log.jsonl").write_text(
            '{"iter": 1, "loss": 2.0}\n{"iter": 2, "loss": 30.0}\n{"iter": 3, "loss": 1e6}\n'
        )
        raise NonFiniteLossError("non-finite loss at iteration 4: loss_cls = nan; stopped before the optimiser step")

    monkeypatch.setattr(ablate, "run_train", fake_train)
    assert run_grids([grid], base, out)["ran"] == ["t/alpha_0.5", "t/alpha_0.75"]
    assert trained == [0.5, 0.75]
    result = json.loads((out / "t" / "alpha_0.75" / "result.json").read_text())
    assert result["status"] == "non-finite" and result["nonfinite_iteration"] == 4
    assert result["losses"] == {"start": [1, 2.0], "peak": [3, 1e6], "end": [3, 1e6], "blow_up": 2}
    assert "| .75 | non-finite loss at iter 4 | - | - |" in (out / "t.md").read_text()
    assert run_grids([grid], base, out)["done"] == ["t/alpha_0.5", "t/alpha_0.75"]  # a result: not run again
    assert not list((out / "t").glob("*.lock"))


def test_held_cells_are_left_to_their_holder_and_stale_locks_are_broken(setup, monkeypatch):
    base, grid, out = setup
    ran = []
    monkeypatch.setattr(
        ablate,
        "run_cell",
        lambda p: (
            ran.append(p.cell.name)
            or {
                "status": "finished",
                "metrics": {"AP": 0.5, "AP50": 0.6, "AP75": 0.4},
                "train_seconds": 1.0,
                "config": p.plan(),
            }
        ),
    )
    folder = out / "t"
    folder.mkdir(parents=True)
    # alpha_0.5 held by a live process of this host (this one), alpha_0.75 by a process that has exited
    live = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": "x"}
    (folder / "alpha_0.5.lock").write_text(json.dumps(live))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "alpha_0.75.lock").write_text(json.dumps({**live, "pid": int(dead.stdout)}))
    outcome = run_grids([grid], base, out)
    assert outcome["held"] == ["t/alpha_0.5"] and outcome["ran"] == ["t/alpha_0.75"] and ran == ["alpha_0.75"]
    assert f"running ({socket.gethostname()} pid {os.getpid()})" in (out / "t.md").read_text()
    assert (folder / "alpha_0.5.lock").exists() and not (folder / "alpha_0.75.lock").exists()
    # a lock of another machine is trusted until it misses its heartbeats for STALE_AFTER seconds
    (folder / "alpha_0.5.lock").write_text(json.dumps({**live, "host": "elsewhere"}))
    assert run_grids([grid], base, out)["held"] == ["t/alpha_0.5"]
    old = time.time() - locks.STALE_AFTER - 5
    os.utime(folder / "alpha_0.5.lock", (old, old))
    assert run_grids([grid], base, out)["ran"] == ["t/alpha_0.5"]


def test_claim_is_exclusive_and_release_keeps_anothers_lock(tmp_path):
    path = tmp_path / "c.lock"
    first = locks.claim(path)
    assert first is not None and locks.claim(path) is None  # held by a live process: this one
    assert locks.read_lock(path)["pid"] == os.getpid()
    first.release()
    assert not path.exists()
    second = locks.claim(path)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # someone broke and took it meanwhile
    second.release()
    assert path.exists()


@pytest.mark.slow
def test_two_processes_share_a_grid_without_running_a_cell_twice(tmp_path):
    base = write_run_config(tmp_path / "base.yaml", **TINY)
    cells = [{"name": f"alpha_{a}", "values": {"alpha": a}, "set": {"model.alpha": a}} for a in (0.25, 0.5, 0.75)]
    grid = _write(tmp_path / "grid.yaml", {**GRID, "cells": cells})
    command = [
        sys.executable,
        "-m",
        "retinanet.cli",
        "ablate",
        "--grid",
        str(grid),
        "--config",
        str(base),
        "--output",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    started = [line for out in outputs for line in out.splitlines() if line.startswith("ablate: running")]
    assert sorted(started) == sorted(f"ablate: running t/{c['name']}" for c in cells)  # each exactly once
    table = (tmp_path / "out" / "t.md").read_text()
    assert "not run" not in table and "running" not in table and table.count("\n| .") == 3


def test_torchrun_ranks_train_alone_from_their_own_place(setup, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    base, grid, out = setup
    seen = []
    monkeypatch.setattr(ablate, "_run_if_free", lambda p: seen.append((p.cell.name, "RANK" in os.environ)) or "held")
    run_grids([grid], base, out)
    assert seen == [("alpha_0.75", False), ("alpha_0.5", False)]  # rank 1 of 2 starts half-way; no process group


def test_loss_history_finds_the_peak_and_a_blow_up(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [
        {"iter": 1, "loss": 5.0},
        {"iter": 2, "loss": 1.0},
        {"iter": 2, "eval/AP": 0.1},
        {"iter": 3, "loss": 9.0},
        {"iter": 4, "loss": 11.0},
        {"iter": 5, "loss": 0.5},
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut short")
    assert loss_history(log) == {"start": [1, 5.0], "peak": [4, 11.0], "end": [5, 0.5], "blow_up": 4}
    assert loss_history(tmp_path / "missing.jsonl") is None


def test_rows_sharing_a_name_show_their_best_cell(tmp_path):
    cells = [{"name": f"g2_a{a}", "row": "g2", "values": {"gamma": 2, "alpha": a}} for a in (0.25, 0.5)]
    grid = load_grid(_write(tmp_path / "g.yaml", {"table": "b", "columns": ["gamma", "alpha"], "cells": cells}))
    results = {
        "g2_a0.25": {"status": "finished", "metrics": {"AP": 0.30, "AP50": 0.5, "AP75": 0.3}, "train_seconds": 10},
        "g2_a0.5": {
            "status": "finished",
            "metrics": {"AP": 0.341, "AP50": 0.525, "AP75": 0.365},
            "train_seconds": 12.4,
        },
    }
    lines = render_table(grid, results).splitlines()
    assert lines[2] == "| gamma | alpha | AP | AP50 | AP75 | train s |"
    assert lines[4] == "| 2 | .5 (best of 2) | 34.1 | 52.5 | 36.5 | 12 |" and len(lines) == 5
    assert format_value(0.999) == ".999" and format_value(None) == "-" and format_value("OHEM 1:3") == "OHEM 1:3"


def test_plan_puts_each_cell_in_its_own_folder(setup):
    base, grid, out = setup
    planned = plan_grid(grid, base, out)
    assert [p.folder for p in planned] == [out / "t" / "alpha_0.5", out / "t" / "alpha_0.75"]
    assert "output_dir" not in planned[0].plan()["train"] and planned[0].plan()["model"]["alpha"] == 0.5


def test_only_named_cells_run_and_the_table_still_lists_all(setup, monkeypatch):
    base, grid, out = setup
    seen = []
    monkeypatch.setattr(ablate, "_run_if_free", lambda p: seen.append(p.cell.name) or "held")
    run_grids([grid], base, out, only=["alpha_0.75"])
    assert seen == ["alpha_0.75"]
    assert "| .5 | not run |" in (out / "t.md").read_text()
    with pytest.raises(ValueError, match=r"no cell named \['alpha_9'\]"):
        run_grids([grid], base, out, only=["alpha_9"])


def test_a_setting_added_by_newer_code_does_not_void_finished_cells():
    old = {"model": {"alpha": 0.5}, "train": {"lr": 0.01}}
    new = {"model": {"alpha": 0.5, "new_setting": "default"}, "train": {"lr": 0.01}}
    assert ablate._differences(old, new) == []
    assert ablate._differences(old, {**new, "train": {"lr": 0.02}}) == ["train.lr"]


def test_a_cell_that_is_the_same_run_as_a_finished_one_of_another_grid_takes_its_result(setup, monkeypatch):
    base, grid, out = setup
    other = load_grid(
        _write(
            out.parent / "other.yaml",
            {
                **GRID,
                "table": "u",
                "title": "Table U",
                "cells": [{"name": f"a{a}", "values": {"alpha": a}, "set": {"model.alpha": a}} for a in (0.75, 0.9)],
            },
        )
    )
    trained = []

    def fake_train(cfg, resume=None, evaluate=True):
        trained.append(cfg.model.alpha)
        raise NonFiniteLossError(f"non-finite loss at iteration {int(100 * cfg.model.alpha)}: loss_cls = nan")

    monkeypatch.setattr(ablate, "run_train", fake_train)
    outcome = run_grids([grid, other], base, out)
    assert trained == [0.5, 0.75, 0.9]  # u/a0.75 is t/alpha_0.75's run: not trained twice
    assert outcome["ran"] == ["t/alpha_0.5", "t/alpha_0.75", "u/a0.9"] and outcome["done"] == ["u/a0.75"]
    reused = json.loads((out / "u" / "a0.75" / "result.json").read_text())
    assert reused["same_run_as"] == "t/alpha_0.75" and reused["nonfinite_iteration"] == 75
    assert "| .75 | non-finite loss at iter 75 |" in (out / "u.md").read_text()
    assert run_grids([grid, other], base, out)["done"] == ["t/alpha_0.5", "t/alpha_0.75", "u/a0.75", "u/a0.9"]
