"""Typed training settings: optimiser, learning-rate schedule, precision, logging and checkpoint cadence.

Defaults are the paper's 1x schedule (Detectron): SGD, lr 0.01 for 16 images per iteration, momentum 0.9,
weight decay 1e-4, 90k iterations with the lr divided by 10 at 60k and 80k, and Detectron's linear warm-up
(500 iterations from lr / 3). The lr is for `batch_size` 16; with another batch size scale it linearly
(`lr=0.01 * batch_size / 16`, Goyal et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retinanet.config import apply_overrides, config_to_dict

__all__ = ["TrainConfig", "train_config"]

AMP_MODES = ("none", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    """Every setting of a training run. Iterations count optimiser steps; 1-based in logs and checkpoints."""

    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.01  # for batch_size 16, as the paper
    momentum: float = 0.9  # SGD momentum (AdamW: beta1)
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # BatchNorm/GroupNorm weights and biases (detectron2 does not decay them)
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3  # the lr rises linearly from lr * warmup_factor to lr over warmup_iters
    steps: tuple[int, ...] = (60_000, 80_000)  # iterations after which the lr is divided by 10
    max_iters: int = 90_000
    batch_size: int = 16  # images per iteration, summed over all processes
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    amp: str = "none"  # "none" | "bf16" (CPU or CUDA) | "fp16" (CUDA, with a GradScaler)
    channels_last: bool = True  # convolutions in channels-last layout: faster with oneDNN (CPU) and cuDNN
    seed: int = 0
    log_every: int = 20
    eval_every: int = 0  # 0: evaluate only at the end (when an eval_fn is given)
    checkpoint_every: int = 5_000
    keep_all_checkpoints: bool = False  # also keep iter_0005000.pt etc. beside last.pt
    output_dir: str = "runs/retinanet"
    num_workers: int = 4
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train config: optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"train config: amp {self.amp!r} is not one of {AMP_MODES}")
        for name in ("max_iters", "log_every", "checkpoint_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train config: {name} must be >= 1, got {getattr(self, name)}")
        if list(self.steps) != sorted(self.steps):
            raise ValueError(f"train config: steps must be increasing, got {self.steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"train config: grad_clip must be > 0 or None, got {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train config") -> "TrainConfig":
        return apply_overrides(cls(), data, where)


def train_config(**overrides: Any) -> TrainConfig:
    """The paper's schedule with keyword overrides; an unknown key raises ValueError naming it."""
    return apply_overrides(TrainConfig(), overrides, "train config")
