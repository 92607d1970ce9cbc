"""The optimiser (SGD as the paper, or AdamW) and the learning-rate schedule (Detectron's warm-up and steps, or a
cosine decay), in iterations."""

from __future__ import annotations

import bisect
import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from retinanet.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "fit_schedule", "lr_factor"]


def lr_factor(
    iteration: int, warmup_iters: int, warmup_factor: float, steps: tuple[int, ...], cosine_iters: int | None = None
) -> float:
    """The multiplier of the base lr at 0-based `iteration`: linear warm-up from warmup_factor to 1 over
    warmup_iters, then either times 0.1 for each step already passed (iteration >= step), as Detectron's
    WarmupMultiStepLR, or, with cosine_iters (the run's length), a cosine decay from 1 to 0 over the iterations
    after the warm-up."""
    if cosine_iters is not None:
        progress = min(max(iteration - warmup_iters, 0) / max(cosine_iters - warmup_iters, 1), 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 0.1 ** bisect.bisect_right(steps, iteration)
    if iteration >= warmup_iters:
        return decay
    alpha = iteration / warmup_iters
    return decay * (warmup_factor * (1 - alpha) + alpha)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """LambdaLR of `lr_factor` over the run's schedule in iterations (TrainConfig.schedule: fractional steps
    resolved, warm-up fitted to the run); call .step() once per iteration, after optimizer.step()."""
    return LambdaLR(optimizer, _schedule(cfg))


def fit_schedule(scheduler: LambdaLR, cfg: TrainConfig) -> None:
    """Refit the schedule of `scheduler` to cfg.max_iters, which train.minutes moves as it measures the speed; the
    next step() takes it. (LambdaLR saves no function in its state: a resumed run builds it from the config.)"""
    scheduler.lr_lambdas = [_schedule(cfg)] * len(scheduler.lr_lambdas)


def _schedule(cfg: TrainConfig) -> functools.partial:
    plan = cfg.schedule()
    return functools.partial(
        lr_factor,
        warmup_iters=plan.warmup_iters,
        warmup_factor=cfg.warmup_factor,
        steps=plan.steps,
        cosine_iters=cfg.max_iters if cfg.lr_schedule == "cosine" else None,
    )


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (paper) or AdamW over the trainable parameters; norm layers' parameters get cfg.weight_decay_norm."""
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, _NORM_TYPES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": cfg.weight_decay_norm})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
