"""A run's logs: log.jsonl (one JSON line per logged iteration), TensorBoard scalars and train.log notes."""

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

from retinanet.outputs import strict_json

__all__ = ["Progress", "RunLog", "write_note"]


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
    path.write_text("".join(kept), encoding="utf-8")


class Progress:
    """The run's progress on rank 0: a tqdm bar on a terminal; elsewhere (a log file, CI, a notebook's captured
    output) one line per logged iteration, so that redirected output holds lines, not carriage returns."""

    def __init__(self, total: int, start: int, enabled: bool = True, terminal: bool | None = None):
        self.total, self.n, self.start = total, start, start
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, initial=start, disable=not (enabled and self.terminal), desc="train",
                        dynamic_ncols=True)  # fmt: skip
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
        print(f"train: iteration {self.n}/{self.total} ({rate:.2f} it/s, {left / 60:.1f} min left): {losses}, "
              f"lr {lr:.3g}", flush=True)  # fmt: skip

    def close(self) -> None:
        self.bar.close()
