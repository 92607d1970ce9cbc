"""What a run saves to be resumed exactly, and puts back: the weights, optimiser, lr schedule, grad scaler, every
process's random-number generators, the data position and the run's fast paths."""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retinanet.config import TrainConfig
from retinanet.model.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from retinanet.runtime import fastpath
from retinanet.train.distributed import gather
from retinanet.train.stream import BatchStream

__all__ = [
    "Resume",
    "check_resumable",
    "checkpoint_run",
    "open_resume",
    "restore_rng",
    "restore_run",
    "seed_everything",
]


@dataclass
class Resume:
    """A checkpoint to resume from, read once and checked against the run's config (`open_resume`)."""

    path: Path
    checkpoint: dict[str, Any]


def open_resume(path: str | Path | Resume, cfg: TrainConfig) -> Resume:
    """The checkpoint at `path` read (once: the run's checks and its loop share it) and checked against `cfg`
    (`check_resumable`); a Resume given is returned as it is."""
    if isinstance(path, Resume):
        return path
    checkpoint = load_checkpoint(path, map_location="cpu")  # a missing or unreadable file stops here, in one line
    check_resumable(checkpoint, path, cfg)
    return Resume(Path(path), checkpoint)


def check_resumable(checkpoint: dict[str, Any], path: str | Path, cfg: TrainConfig) -> None:
    """One line when a checkpoint cannot be resumed exactly with this config (another batch size moves the data
    position and the lr schedule)."""
    saved = (checkpoint.get("train_config") or {}).get("batch_size")
    if saved is not None and saved != cfg.batch_size:
        raise ValueError(
            f"{path}: the run trained with train.batch_size {saved}, this config says {cfg.batch_size}: "
            f"resume with train.batch_size={saved}, or start a new run from its weights with "
            f"model.init_from={path}"
        )


def checkpoint_run(
    out: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    scaler,
    iteration: int,
    cfg: TrainConfig,
    stream: BatchStream,
    rank: int,
    world: int,
    fast: fastpath.RunFastPaths,
    ema: dict[str, Any] | None = None,
    best: dict[str, Any] | None = None,
    train_seconds: float | None = None,
) -> None:
    """last.pt (and with keep_all_checkpoints iter_N.pt) of the run at `iteration`, written by rank 0 with every
    process's random generators (a collective: every process calls it), the moving average, the best evaluation so
    far and (train.minutes) the training seconds spent."""
    rngs = gather(rng_state(), world)  # collective: every process must call it
    if rank != 0:
        return
    args = (model, optimizer, scheduler, scaler, iteration, cfg, stream.position, rngs)
    extra = {k: v for k, v in (("best", best), ("train_seconds", train_seconds)) if v} or None
    save_checkpoint(out / "last.pt", *args, extra=extra, fast_paths=fast, ema=ema)
    if cfg.keep_all_checkpoints:
        save_checkpoint(out / f"iter_{iteration:07d}.pt", *args, extra=extra, fast_paths=fast, ema=ema)


def restore_run(checkpoint: dict[str, Any], path: str | Path, model: nn.Module, optimizer, scheduler, scaler) -> None:
    """Load a checkpoint's model, optimiser, schedule and scaler states into the given objects."""
    saved = checkpoint["model_config"]
    config = getattr(model, "config", None)
    if saved is not None and dataclasses.is_dataclass(config):
        differ = sorted(
            k for k, v in dataclasses.asdict(config).items() if k in saved and _plain_value(saved[k]) != _plain_value(v)
        )
        if differ:
            warnings.warn(f"resuming from {path}: the model config differs in {differ}", stacklevel=3)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])  # moves the state onto the parameters' device
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])


def _plain_value(v: Any) -> Any:
    return [_plain_value(x) for x in v] if isinstance(v, (list, tuple)) else v


def restore_rng(states: list[dict[str, Any]], rank: int, world: int) -> None:
    if len(states) != world:
        warnings.warn(
            f"the checkpoint holds random states of {len(states)} processes, this run has {world}: "
            "random augmentations will differ from an uninterrupted run",
            stacklevel=3,
        )
        return
    set_rng_state(states[rank])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
