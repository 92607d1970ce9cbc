"""Processes and devices: joining a torchrun process group, the rank lookup, DDP around the loss, and the device
(and precision) a config asks for."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from retinanet import fastpath
from retinanet.config import TrainConfig
from retinanet.model.detector import RetinaNet

__all__ = [
    "LossModule",
    "launched_slot",
    "check_batch_size",
    "gather",
    "init_distributed",
    "rank_and_world",
    "resolve_device",
    "resolve_device_and_amp",
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


def resolve_device_and_amp(cfg: TrainConfig, flags: bool = False) -> tuple[torch.device, str]:
    """The device and the precision to run in ("none", "bf16", "fp16"; amp "auto" resolved by measurement, or the
    cache's choice). A training run makes this choice in `train` instead (fastpath.begin_run), once for all its
    processes. flags: errors name the command's --device and --amp (else train.device and train.amp)."""
    device = resolve_device(cfg, flags)
    return device, fastpath.choose_amp(cfg.amp, device)


def resolve_device(cfg: TrainConfig, flags: bool = False) -> torch.device:
    """The device to run on; a ValueError for one this machine lacks, or for a precision it cannot run (measures
    nothing). flags: the errors name the command's --device and --amp, as the user set them (else the config's
    train.device and train.amp)."""
    name = cfg.device
    said, device_key, amp_key = ("", "--device ", "--amp ") if flags else ("train config: ", "train.device=", "train.amp=")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{said}device {name!r} but this machine has no CUDA GPU that torch can use; use "
                         f"{device_key}cpu (or auto)")  # fmt: skip
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # init_distributed pinned this process's GPU
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError(f"{said}amp 'fp16' needs a CUDA device, got {device}; use {amp_key}none on a CPU")
    try:
        fastpath.check_amp(cfg.amp, device)
    except ValueError as exc:
        raise ValueError(f"{said}{exc}") from None
    return device


def check_batch_size(loader: DataLoader, cfg: TrainConfig, world: int) -> None:
    per_process = getattr(loader, "batch_size", None)
    if per_process is not None and per_process * world != cfg.batch_size:
        warnings.warn(f"the loader gives {per_process} images x {world} process(es) per iteration but "
                      f"cfg.batch_size is {cfg.batch_size}: cfg.lr = {cfg.lr} may not suit the real batch size",
                      stacklevel=3)
