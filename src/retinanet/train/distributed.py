"""Processes and devices: joining a torchrun process group, the rank lookup, DDP around the loss, and the device
(and precision) a training config asks for."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from retinanet.config import TrainConfig
from retinanet.model.detector import RetinaNet
from retinanet.runtime.device import check_precision, resolve_device

__all__ = [
    "LossModule",
    "launched_slot",
    "check_batch_size",
    "per_process_batch",
    "gather",
    "init_distributed",
    "rank_and_world",
    "train_device",
    "wrap_for_ddp",
]


def init_distributed() -> tuple[int, int, int]:
    """Join the process group when launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment):
    NCCL with this process's GPU pinned when CUDA is available, Gloo otherwise. Call before building the loader.
    Returns (rank, world_size, local_rank); (0, 1, 0) when not launched that way."""
    slot = launched_slot()
    if slot is None:
        return 0, 1, 0
    rank, world, local_rank = slot
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, store=_attempt_store(rank, world), rank=rank, world_size=world)
    return rank, world, local_rank


def _attempt_store(rank: int, world: int) -> dist.Store:
    """The store at torchrun's MASTER_ADDR/PORT, its keys prefixed by the restart attempt
    (TORCHELASTIC_RESTART_COUNT). torchrun's agent keeps one store across restarts (the shared rendezvous store), so
    the keys of a killed attempt are still there: a restarted rank could read a dead rank's Gloo address before
    the new one replaces it, and fail to connect ("Connection refused") or wait for a peer that is gone."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
    return dist.PrefixStore(f"retinanet/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def launched_slot(forget: bool = False) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or None when the
    process was not launched by it. forget: remove the variables, so that nothing later joins a process group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    read = os.environ.pop if forget else os.environ.get
    return int(read("RANK")), int(read("WORLD_SIZE")), int(read("LOCAL_RANK", 0))


class LossModule(nn.Module):
    """model.loss as forward(): DistributedDataParallel's hooks (gradient all-reduce, buffer broadcast) apply only
    to calls of forward, and RetinaNet's forward gives head outputs, not losses."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.model.loss(images, targets, resize=False)


def wrap_for_ddp(model: RetinaNet, device: torch.device, world: int) -> nn.Module:
    module = LossModule(model)
    if world == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def train_device(cfg: TrainConfig) -> torch.device:
    """The device a training config asks for (retinanet.runtime.device's rule; errors name train.device and
    train.amp), its precision checked (measures nothing)."""
    device = resolve_device(cfg.device, "train.device")
    check_precision(cfg.amp, device, "train.amp")
    return device


def per_process_batch(batch_size: int, world: int) -> int:
    """The images each of `world` processes takes per iteration: train.batch_size split evenly, or a ValueError that
    names the numbers (an uneven split would train on another batch size than the lr was set for)."""
    if batch_size % world:
        lower, upper = batch_size - batch_size % world, batch_size + world - batch_size % world
        choices = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"train.batch_size {batch_size} does not split evenly over {world} processes "
            f"({batch_size / world:g} images each): use train.batch_size={choices}"
        )
    return batch_size // world


def check_batch_size(loader: DataLoader, cfg: TrainConfig, world: int) -> None:
    """The loader's batch times the processes is train.batch_size (the lr is set for it); a ValueError otherwise."""
    per_process = getattr(loader, "batch_size", None)
    if per_process is not None and per_process != per_process_batch(cfg.batch_size, world):
        raise ValueError(
            f"the loader gives {per_process} images x {world} process(es) per iteration but "
            f"train.batch_size is {cfg.batch_size}: make the loader's batch "
            f"{cfg.batch_size // world}"
        )
