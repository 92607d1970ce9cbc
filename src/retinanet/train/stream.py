"""The training loader as an endless stream of batches that can restart at any position."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

__all__ = ["BatchStream"]


class BatchStream:
    """The loader as an endless stream of batches. Each epoch's order depends only on (seed, epoch), and
    `position` = {"epoch", "batch" (batches taken in that epoch)} is enough to restart at the same place.

    For that it seeds the loader's generator (giving it one if it has none, and to a RandomSampler without one)
    at the start of every epoch, and calls sampler.set_epoch(epoch) where the sampler has it (DistributedSampler).
    """

    def __init__(self, loader: DataLoader, seed: int, epoch: int = 0, batch: int = 0):
        self.loader, self.seed, self.epoch, self.batch = loader, seed, epoch, 0
        self._iterator = self._start_epoch()
        # Replay rather than skip indices: the replayed batches advance the loader's generators exactly as before.
        for _ in range(batch):
            if next(self._iterator, None) is None:
                raise ValueError(f"cannot resume at batch {batch} of epoch {epoch}: the loader has fewer batches")
            self.batch += 1

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def next(self) -> Any:
        """The next batch, starting a new epoch when the current one is exhausted."""
        batch = next(self._iterator, None)
        if batch is None:
            self.epoch, self.batch = self.epoch + 1, 0
            self._iterator = self._start_epoch()
            batch = next(self._iterator, None)
            if batch is None:
                raise ValueError("the training loader yields no batches")
        self.batch += 1
        return batch

    def _start_epoch(self) -> Any:
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):  # DistributedSampler shuffles by (its seed, epoch)
            sampler.set_epoch(self.epoch)
        if self.loader.generator is None:
            self.loader.generator = torch.Generator()
        generators = [self.loader.generator]
        if isinstance(sampler, RandomSampler):
            if sampler.generator is None:  # it would draw its permutation from the global generator
                sampler.generator = self.loader.generator
            generators.append(sampler.generator)
        for g in generators:
            g.manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return iter(self.loader)
