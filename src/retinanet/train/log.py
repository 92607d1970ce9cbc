"""A run's logs: log.jsonl (one JSON line per logged iteration), TensorBoard scalars and train.log notes."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

__all__ = ["RunLog", "write_note"]


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
        self.file.write(json.dumps({"iter": iteration, **values}, default=_plain) + "\n")
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


def _plain(value: Any) -> Any:
    """json.dumps fallback for tensors and numpy values."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _truncate_log(path: Path, iteration: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a crash is dropped
            if json.loads(line)["iter"] <= iteration:
                kept.append(line + "\n")
    path.write_text("".join(kept), encoding="utf-8")
