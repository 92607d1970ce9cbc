"""Typed training settings: optimiser, learning-rate schedule, precision, logging and checkpoint cadence.

Defaults are the paper's 1x schedule (Detectron): SGD, lr 0.01 for 16 images per iteration, momentum 0.9,
weight decay 1e-4, 90k iterations with the lr divided by 10 after 2/3 and 8/9 of them (60k and 80k), and
Detectron's linear warm-up (500 iterations from lr / 3). The lr is for `batch_size` 16; with another batch size
scale it linearly (`lr=0.01 * batch_size / 16`, Goyal et al. 2017).

So that the schedule fits any run length, `steps` below 1 are fractions of max_iters, and a warm-up longer than
a fifth of the run is shortened to that with a warning (`schedule`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from retinanet.config.checked import Checked, apply_overrides, config_to_dict

__all__ = ["TrainConfig", "train_config", "Schedule"]

AMP_MODES = ("none", "bf16", "fp16", "auto")
OPTIMIZERS = ("sgd", "adamw")
MAX_WARMUP_SHARE = 0.2


@dataclass
class TrainConfig(Checked):
    """Every setting of a training run. Iterations count optimiser steps; 1-based in logs and checkpoints."""

    WHERE = "train config"

    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.01  # for batch_size 16, as the paper
    momentum: float = 0.9  # SGD momentum (AdamW: beta1)
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # BatchNorm/GroupNorm weights and biases (detectron2 does not decay them)
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3  # the lr rises linearly from lr * warmup_factor to lr over warmup_iters
    # after these the lr is divided by 10: iterations, or below 1 fractions of max_iters (the paper's 60k and 80k
    # of 90k); lr_schedule "cosine" instead decays the lr from its value to 0 along a half cosine after the warm-up
    steps: tuple[float, ...] = (2 / 3, 8 / 9)
    lr_schedule: str = "step"
    max_iters: int = 90_000
    # a budget of training time instead: the run's length (max_iters, and the schedule with it) is set from the
    # measured speed so that training ends when this many minutes are spent (evaluation not counted;
    # retinanet.train.budget). None: max_iters as given
    minutes: float | None = None
    batch_size: int = 16  # images per iteration, summed over all processes
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    # "none" (float32), "bf16" (CUDA, or a CPU with native bf16), "fp16" (CUDA, with a GradScaler), "auto" (bf16
    # where measured faster: retinanet.runtime.fastpath)
    amp: str = "none"
    seed: int = 0
    log_every: int = 20
    # validation during training: every eval_every iterations (0: at the end only) on the validation set and on a
    # fixed subset of eval_train_images training images (0: none), whose gap to validation shows a model learning its
    # data by heart; best.pt keeps the weights of the best validation best_metric
    eval_every: int = 0
    eval_train_images: int = 32
    best_metric: str = "AP"
    # with several validation sets (data.extra_val), best.pt is chosen by the weighted mean of best_metric over
    # them: a set name ("val" for the first) -> its weight; None: every set weighs the same
    best_weights: dict[str, float] | None = None
    report: bool = True  # the last evaluation also writes eval/report/index.html (retinanet.evaluation.report)
    # an exponential moving average of the weights (torch.optim.swa_utils.AveragedModel), evaluated, saved with the
    # checkpoints and given to inference: the decay per iteration (ramped up over the first ones), None: off
    ema_decay: float | None = None
    checkpoint_every: int = 5_000
    checkpoint_minutes: float | None = 10.0  # also a checkpoint when this much time has passed since the last
    keep_all_checkpoints: bool = False  # also keep iter_0005000.pt etc. beside last.pt
    output_dir: str = "runs/retinanet"
    # "auto": continue from output_dir/last.pt when there is one, else start fresh (a job restarted by torchrun
    # --max-restarts, or resubmitted on a preemptible node, picks up where it stopped); or a checkpoint's path
    resume: str | None = None
    num_workers: int | None = None  # DataLoader processes; None: min(4, cores - 1); more than the cores are capped
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...

    def problems(self) -> list[str]:
        out = []
        if self.optimizer not in OPTIMIZERS:
            out.append(f"optimizer = {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if self.amp not in AMP_MODES:
            out.append(f"amp = {self.amp!r} is not one of {list(AMP_MODES)}")
        if self.lr_schedule not in ("step", "cosine"):
            out.append(f"lr_schedule = {self.lr_schedule!r} is not one of ['step', 'cosine']")
        for name in ("max_iters", "log_every", "checkpoint_every", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        in_iters = [s * self.max_iters if s < 1 else s for s in self.steps]  # fractions and iterations alike
        if any(not s > 0 for s in self.steps) or in_iters != sorted(in_iters):
            out.append(
                f"steps must be positive and increasing (fractions of max_iters or iterations), got {list(self.steps)}"
            )
        if self.warmup_iters < 0 or not 0 < self.warmup_factor <= 1:
            out.append(
                f"warmup_iters must be >= 0 and warmup_factor in (0, 1], got {self.warmup_iters}, {self.warmup_factor}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            out.append(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            out.append(f"num_workers must be a whole number >= 0 or None, got {self.num_workers!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            out.append(f"device = {self.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
        weights = self.best_weights
        if weights is not None and (
            not isinstance(weights, dict)
            or not weights
            or not all(isinstance(v, (int, float)) and v >= 0 for v in weights.values())
            or sum(weights.values()) <= 0
        ):
            out.append(f"best_weights must map validation set names to weights >= 0 (not all 0), got {weights!r}")
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            out.append(f"minutes must be > 0 or None, got {self.minutes}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            out.append(f"checkpoint_minutes must be > 0 or None, got {self.checkpoint_minutes}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            out.append(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.eval_every < 0 or self.eval_train_images < 0:
            out.append(
                f"eval_every and eval_train_images must be >= 0, got {self.eval_every}, {self.eval_train_images}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            out.append(f"lr must be > 0, got {self.lr}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train config") -> "TrainConfig":
        return apply_overrides(cls(), data, where)

    def schedule(self) -> "Schedule":
        """The lr schedule in iterations for this run's length, and the warnings about it."""
        return Schedule.of(self)

    def workers(self) -> tuple[int, str | None]:
        """(DataLoader processes to use, a warning or None): num_workers, or min(4, cores - 1) when None; never
        more than the machine's cores."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self.num_workers is None:
            return min(4, max(cores - 1, 0)), None
        if self.num_workers > cores:
            return cores, f"num_workers {self.num_workers} is more than this machine's {cores} cores: using {cores}"
        return self.num_workers, None


@dataclass(frozen=True)
class Schedule:
    """The lr schedule of a run in iterations: warm-up length and the iterations after which the lr is divided by
    10, with warnings where the config did not fit the run's length."""

    warmup_iters: int
    steps: tuple[int, ...]
    warnings: tuple[str, ...]
    cosine: bool = False

    @classmethod
    def of(cls, cfg: TrainConfig) -> "Schedule":
        warnings = []
        steps = tuple(round(s * cfg.max_iters) if s < 1 else int(s) for s in cfg.steps)
        late = [s for s, given in zip(steps, cfg.steps) if given >= 1 and s >= cfg.max_iters]
        if cfg.lr_schedule == "cosine":
            steps, late = (), []
        if late:
            warnings.append(
                f"lr steps {late} are at or after max_iters {cfg.max_iters}: the lr never decays there; "
                "give steps as fractions of max_iters, e.g. [0.667, 0.889]"
            )
        warmup = cfg.warmup_iters
        longest = int(MAX_WARMUP_SHARE * cfg.max_iters)
        if warmup > longest:
            warnings.append(
                f"warmup_iters {warmup} is more than a fifth of max_iters {cfg.max_iters}: the warm-up "
                f"is shortened to {longest} iterations"
            )
            warmup = longest
        return cls(warmup, steps, tuple(warnings), cfg.lr_schedule == "cosine")

    def describe(self) -> str:
        if self.cosine:
            return f"warm-up {self.warmup_iters} iterations, then a cosine decay to 0"
        decay = ", ".join(str(s) for s in self.steps) or "never"
        return f"warm-up {self.warmup_iters} iterations, lr / 10 after iterations {decay}"


def train_config(**overrides: Any) -> TrainConfig:
    """The paper's schedule with keyword overrides; an unknown key raises ValueError naming it."""
    return apply_overrides(TrainConfig(), overrides, "train config")
