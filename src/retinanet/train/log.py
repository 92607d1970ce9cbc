"""A run's logs: log.jsonl (one JSON line per logged iteration), TensorBoard scalars, train.log notes, and the
training curves drawn from log.jsonl."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from retinanet.runtime.outputs import atomic_write, save_figure, strict_json

__all__ = ["Progress", "RunLog", "plot_training_curves", "write_note"]


class RunLog:
    """JSON lines at output_dir/log.jsonl, TensorBoard scalars at output_dir/tb and notes (the run's summary,
    warnings, where it stopped) printed and appended to output_dir/train.log; silent when not enabled (processes
    other than rank 0). A run starting at iteration N (0 when fresh) drops what an earlier run in the folder
    logged after N, so that the log reads as one history."""

    def __init__(self, output_dir: Path, enabled: bool = True, start: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "log.jsonl"
        _truncate_log(self.path, start)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = SummaryWriter(str(output_dir / "tb"), purge_step=start + 1)

    def note(self, text: str, echo: bool = True) -> None:
        """Keep a line in train.log and (echo) print it above the progress bar."""
        if not self.enabled:
            return
        if echo:
            tqdm.write(text)
        write_note(self.path.parent, text)

    def write(self, iteration: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(strict_json({"iter": iteration, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
                self.tb.add_scalar(k if "/" in k else f"train/{k}", float(v), iteration)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def write_note(output_dir: Path, text: str) -> None:
    """Append a timestamped line to output_dir/train.log."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "train.log", "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def _truncate_log(path: Path, iteration: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a crash is dropped
            if json.loads(line)["iter"] <= iteration:
                kept.append(line + "\n")
    atomic_write(path, "".join(kept))


class Progress:
    """The run's progress on rank 0: a tqdm bar on a terminal; elsewhere (a log file, CI, a notebook's captured
    output) one line per logged iteration, so that redirected output holds lines, not carriage returns."""

    def __init__(self, total: int, start: int, enabled: bool = True, terminal: bool | None = None):
        self.total, self.n, self.start = total, start, start
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(
            total=total, initial=start, disable=not (enabled and self.terminal), desc="train", dynamic_ncols=True
        )
        self.t0 = time.perf_counter()

    def update(self) -> None:
        self.n += 1
        self.bar.update()

    def show(self, values: Mapping[str, float], lr: float) -> None:
        """The latest losses: in the bar's postfix, or as a line of their own."""
        if not self.enabled:
            return
        if self.terminal:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, lr=f"{lr:.3g}")
            return
        rate = (self.n - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        losses = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(
            f"train: iteration {self.n}/{self.total} ({rate:.2f} it/s, {left / 60:.1f} min left): {losses}, "
            f"lr {lr:.3g}",
            flush=True,
        )

    def close(self) -> None:
        self.bar.close()


def plot_training_curves(log_jsonl: str | Path, path: str | Path) -> Path:
    """One PNG with every loss of log.jsonl against the iteration (log scale), the learning rate, and with
    evaluations during training the validation AP (and the training images' AP beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in Path(log_jsonl).read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval/AP" in r]
    rows = [r for r in rows if "lr" in r]
    fig = Figure(figsize=(13 if evals else 9, 4))
    axes = fig.subplots(1, 3 if evals else 2)
    ax, ax_lr = axes[0], axes[1]
    keys = [k for k in rows[0] if k.startswith("loss")] if rows else []
    for k in keys:
        ax.plot([r["iter"] for r in rows], [r[k] for r in rows], label=k)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_title("training losses")
    ax.legend()
    ax_lr.plot([r["iter"] for r in rows], [r["lr"] for r in rows])
    ax_lr.set_xlabel("iteration")
    ax_lr.set_title("learning rate")
    if evals:
        # every validation set's AP (data.extra_val's after their names), then the training images'
        others = sorted({k.split("/")[1] for r in evals for k in r if k.count("/") == 2 and k.endswith("/AP")})
        for key, label in (
            ("eval/AP", "validation AP"),
            ("eval/AP50", "validation AP50"),
            *((f"eval/{n}/AP", f"{n} AP") for n in others),
            ("eval/train_AP", "training images' AP"),
        ):
            points = [(r["iter"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
            if points:
                axes[2].plot(*zip(*points), marker="o", label=label)
        axes[2].set_xlabel("iteration")
        axes[2].set_ylim(0, 1)
        axes[2].set_title("evaluation")
        axes[2].legend()
    fig.tight_layout()
    return save_figure(fig, path)
