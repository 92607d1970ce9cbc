"""An exponential moving average of the weights (torch.optim.swa_utils.AveragedModel): the model that is evaluated,
kept as the best and given to inference, while the optimiser goes on with the raw weights.

The decay of update n is min(decay, (1 + n) / (10 + n)): the average follows the fast-moving weights of the first
iterations closely and settles to `decay` later (TensorFlow's num_updates rule), so that an early evaluation does
not see the random initial weights. Buffers (BatchNorm statistics) are averaged alike; integer ones are copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["build_ema", "ema_state", "load_ema_state"]


def build_ema(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """The moving average of `model` (its `.module` is a model like it), or None when decay is None."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=_ema_update(decay), use_buffers=True)


def _ema_update(decay: float):
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:  # step counters: the current value
            for a, c in zip(averaged, current):
                a.copy_(c)

    return update


def ema_state(ema: AveragedModel | None) -> dict[str, Any] | None:
    """What a checkpoint keeps of the average: the averaged model's state dict and the number of updates."""
    if ema is None:
        return None
    return {"model": ema.module.state_dict(), "updates": int(ema.n_averaged)}


def load_ema_state(ema: AveragedModel | None, state: dict[str, Any] | None, model: nn.Module) -> None:
    """Put a checkpoint's average back; a checkpoint without one starts the average at the resumed weights."""
    if ema is None:
        return
    if state is None:
        ema.module.load_state_dict(model.state_dict())
        return
    ema.module.load_state_dict(state["model"])
    ema.n_averaged.fill_(state["updates"])
