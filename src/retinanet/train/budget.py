"""`train.minutes`: a budget of training time that sets the run's length, as Ultralytics' `time=` does: "train for
30 minutes" instead of counting iterations.

The run starts with the configured max_iters; its warm-up is counted in iterations, so the first estimate (after
FIRST_CHECK iterations, from their speed) comes before the schedule's length matters. From then on, every
CHECK_EVERY iterations the speed of every iteration since the first check (a mean over hundreds of iterations: the
speed of a few tens moves with each batch's augmentation) says how many iterations the remaining minutes hold, and
max_iters - the cosine decay's or the steps' length - follows it when it moves by more than TOLERANCE, or at once
when the time is spent. Evaluation is not counted (the log says how long it took), checkpoints are. The seconds spent
travel with every checkpoint, so that a resumed run spends only what is left. Under DDP rank 0's clock decides for every
process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["CHECK_EVERY", "FIRST_CHECK", "TimeBudget"]

FIRST_CHECK = 20  # iterations of this process before the first estimate (the first ones start the data workers)
CHECK_EVERY = 20
TOLERANCE = 0.02


@dataclass
class TimeBudget:
    """seconds: the budget; spent: training seconds before this process started (a resumed run); start: the
    iteration this process started after. `check` is called after every iteration with the training seconds of
    this process so far."""

    seconds: float
    spent: float = 0.0
    start: int = 0
    _mark: tuple[int, float] | None = None  # (iteration, seconds) of the first check

    def used(self, elapsed: float) -> float:
        """Training seconds of the whole run, this process's `elapsed` included."""
        return self.spent + elapsed

    def check(self, iteration: int, elapsed: float, max_iters: int, device: torch.device | None = None) -> int | None:
        """The run's new length when it should change after `iteration`, else None. Under DDP (device: this process's
        device for the broadcast) every process calls it and takes rank 0's answer."""
        done = iteration - self.start
        if done < FIRST_CHECK or (done - FIRST_CHECK) % CHECK_EVERY:
            return None
        new = self._estimate(iteration, elapsed, max_iters)
        if device is not None:  # rank 0's clock decides: every process takes its answer (-1: no change)
            flag = torch.tensor([new if new is not None else -1], dtype=torch.float64, device=device)
            dist.broadcast(flag, src=0)
            new = int(flag.item()) if flag.item() >= 0 else None
        return new

    def _estimate(self, iteration: int, elapsed: float, max_iters: int) -> int | None:
        if self._mark is None:  # the first check measures from the process's start; later ones from it
            self._mark, mark = (iteration, elapsed), (self.start, 0.0)
        else:
            mark = self._mark
        per_iteration = (elapsed - mark[1]) / max(iteration - mark[0], 1)
        left = self.seconds - self.used(elapsed)
        if left <= 0:
            return iteration if max_iters != iteration else None
        new = iteration + max(1, math.floor(left / max(per_iteration, 1e-9)))
        return new if abs(new - max_iters) > TOLERANCE * max_iters else None
