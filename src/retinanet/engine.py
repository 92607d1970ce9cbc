"""The training loop, its checkpoints and its logs.

`train` is one readable loop: batch -> model.loss -> finite check -> backward -> (clip) -> step -> log / evaluate /
checkpoint. Ctrl-C stops it after the current iteration with a checkpoint (TrainingInterrupted); a second Ctrl-C
stops it at once. A run can be stopped and resumed exactly: a checkpoint holds the weights, optimiser, lr schedule,
grad scaler, every process's random-number generators and the data loader's position, and each epoch's data
order follows from (seed, epoch) alone. With the same seed, a resumed run logs the same losses as one that was
never stopped (exactly so on CPU with num_workers=0; with worker processes the data order is still exact but the
workers' random augmentations restart from their seeds).

Launched by `torchrun`, call `init_distributed()` first and build the loader with a DistributedSampler
(`make_loader(..., distributed=True)`); `train` then wraps the model in DistributedDataParallel and only rank 0
writes logs, checkpoints and the progress bar.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from retinanet import fastpath
from retinanet.config import ModelConfig, apply_overrides
from retinanet.detector import RetinaNet, build_from_config
from retinanet.train_config import TrainConfig

__all__ = [
    "FORMAT_VERSION",
    "BatchStream",
    "LossModule",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "build_optimizer",
    "build_scheduler",
    "init_distributed",
    "load_checkpoint",
    "load_model",
    "lr_factor",
    "resolve_device",
    "resolve_device_and_amp",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "train",
    "write_note",
]

FORMAT_VERSION = 1  # bump when the checkpoint's keys change meaning; load_checkpoint refuses versions it does not know

EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the loss, the iteration and the value."""


class TrainingInterrupted(RuntimeError):
    """Training stopped at Ctrl-C after iteration `iteration`, with a checkpoint at `checkpoint`."""

    def __init__(self, iteration: int, checkpoint: Path):
        super().__init__(f"interrupted after iteration {iteration}; checkpoint saved to {checkpoint}")
        self.iteration, self.checkpoint = iteration, checkpoint


# ------------------------------------------------------------------------------------------------------------------
def train(
    model: RetinaNet,
    train_loader: DataLoader,
    cfg: TrainConfig,
    output_dir: str | Path | None = None,
    eval_fn: EvalFn | None = None,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Train `model` for cfg.max_iters iterations (optimiser steps), from scratch or from the checkpoint `resume`.

    train_loader yields (images, targets): images a list of float [3, H, W] tensors in [0, 1], already resized
        (the loss is called with resize=False); targets per image {"boxes": [N, 4] float XYXY pixels,
        "labels": [N] int64, ...}. It is read as an endless stream of epochs.
    eval_fn(model, iteration) -> {metric: value} runs every cfg.eval_every iterations and at the end, in eval
        mode and on every process (so that it can shard the evaluation); its metrics are logged as "eval/<name>".
    Writes to output_dir (default cfg.output_dir), from rank 0 only: log.jsonl (one line per cfg.log_every
    iterations: iter, each loss and "loss" (their sum) of that iteration on rank 0, lr, time and data_time in
    seconds), tb/ (TensorBoard), last.pt (atomic checkpoints every cfg.checkpoint_every iterations and at the end).
    Returns {"iteration", "losses" (last logged), "metrics" (last evaluation), "checkpoint" (path of last.pt),
    "fast_paths" (the run's fastpath.RunFastPaths: precision, layout, convolution algorithms)}.
    Seeds python, numpy and torch with cfg.seed + rank first, so that a run is a function of its seed.
    Raises NonFiniteLossError, before the optimiser step, when a loss is NaN or infinite.
    """
    rank, world = _rank_and_world()
    cfg.check()
    device = resolve_device(cfg)
    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    _seed_everything(cfg.seed + rank)
    _check_batch_size(train_loader, cfg, world)
    model.to(device).train()
    start, position, checkpoint = 0, {"epoch": 0, "batch": 0}, None
    if resume is not None:
        checkpoint = load_checkpoint(resume, map_location="cpu")
        start, position = checkpoint["iteration"], checkpoint["data_position"] or position
    stream = BatchStream(train_loader, cfg.seed, **position)
    if checkpoint is not None:  # only now: replaying the epoch's consumed batches above drew random numbers
        _restore_rng(checkpoint["rng"], rank, world)
    log = RunLog(out, enabled=rank == 0, start=start)
    first = _to_device(stream.next(), device) if start < cfg.max_iters else None
    # layout, precision and convolution algorithms, once for the run (rank 0's in a distributed run), before DDP
    # compares the replicas; a resumed run takes its checkpoint's
    saved = checkpoint.get("fast_paths") if checkpoint is not None else None
    fast, notes = fastpath.begin_run(model, first, cfg.amp, device, saved)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[fast.amp]
    loss_fn = _loss_module(model, device, world)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=fast.amp == "fp16")
    if checkpoint is not None:
        _restore(checkpoint, resume, model, optimizer, scheduler, scaler)
    for line in [f"warning: {w}" for w in cfg.schedule().warnings] + notes + [fast.describe()]:
        log.note(line)
    bar = tqdm(total=cfg.max_iters, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    t_start, t_eval = time.perf_counter(), 0.0
    values: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    try:
        with _StopOnInterrupt() as stop:
            for it in range(start + 1, cfg.max_iters + 1):
                tic = time.perf_counter()
                images, targets = first if first is not None else _to_device(stream.next(), device)
                first = None
                data_time = time.perf_counter() - tic
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = loss_fn(images, targets)
                total = sum(losses.values())
                stopping = _check_finite(losses, total, it, world > 1, out / "last.pt", stop.requested)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if cfg.grad_clip is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                bar.update()
                if it % cfg.log_every == 0 or it == cfg.max_iters or stopping:
                    values = {k: v.item() for k, v in losses.items()} | {"loss": total.item()}
                    log.write(it, {**values, "lr": lr, "time": time.perf_counter() - tic, "data_time": data_time,
                                   **_coverage_counts(model)})  # fmt: skip
                    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, lr=f"{lr:.3g}")
                if eval_fn is not None and ((cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.max_iters):
                    t_eval -= time.perf_counter()
                    metrics = _evaluate(model, eval_fn, it)
                    t_eval += time.perf_counter()
                    log.write(it, {f"eval/{k}": v for k, v in metrics.items()})
                if it % cfg.checkpoint_every == 0 or it == cfg.max_iters or stopping:
                    _checkpoint(out, model, optimizer, scheduler, scaler, it, cfg, stream, rank, world, fast)
                if stopping and it < cfg.max_iters:
                    log.note(f"interrupted after iteration {it}; checkpoint {out / 'last.pt'}")
                    raise TrainingInterrupted(it, out / "last.pt")
    finally:
        bar.close()
        seconds = time.perf_counter() - t_start - t_eval
        log.note(f"trained iterations {start + 1}..{int(bar.n)} in {seconds:.1f} s "
                 f"(evaluation not counted: {t_eval:.1f} s)", echo=False)  # fmt: skip
        log.note(f"at the end: {fast.describe()}", echo=False)  # with the classes met after the first batch
        log.close()
        fastpath.end_run()
    return {"iteration": max(start, cfg.max_iters), "losses": values, "metrics": metrics, "checkpoint": out / "last.pt",
            "fast_paths": fast}


class _StopOnInterrupt:
    """Ctrl-C (SIGINT) during training: the first asks the loop to stop after the current iteration, which then
    saves a checkpoint; a second raises KeyboardInterrupt at once. Only the main thread can own the handler."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("retinanet: stopping after this iteration to save a checkpoint (Ctrl-C again to quit at once)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_finite(losses: dict[str, Tensor], total: Tensor, iteration: int, distributed: bool, last: Path,
                  stop_requested: bool = False) -> bool:
    """Raise NonFiniteLossError naming every non-finite loss, on all processes at once under DDP; return whether a
    stop (Ctrl-C) was requested on any process."""
    # One host-device sync per iteration: we must know before the optimiser step, or NaN reaches the weights. Under
    # DDP the stop requests travel in the same all-reduce, so that every process stops after the same iteration.
    flags = torch.stack([(~torch.isfinite(total.detach())).float(), total.new_tensor(float(stop_requested))])
    if distributed:  # all stop together, rather than the healthy ones waiting forever in the next all-reduce
        dist.all_reduce(flags)
    bad, stop = flags.tolist()
    if bad == 0:
        return stop > 0
    named = [f"{k} = {v.item()}" for k, v in losses.items() if not torch.isfinite(v)]
    which = ", ".join(named) if named else ("the sum of the losses" if not distributed else "on another process")
    finite = ", ".join(f"{k} = {v.item():.4g}" for k, v in losses.items() if torch.isfinite(v))
    raise NonFiniteLossError(
        f"non-finite loss at iteration {iteration}: {which}" + (f" (finite: {finite})" if finite else "")
        + f"; stopped before the optimiser step. The last checkpoint, if any, is {last}"
    )


def _evaluate(model: nn.Module, eval_fn: EvalFn, iteration: int) -> dict[str, Any]:
    """eval_fn in eval mode; the random generators are put back so that evaluating does not change training."""
    state = rng_state()
    model.eval()
    try:
        with torch.no_grad():
            return dict(eval_fn(model, iteration) or {})
    finally:
        model.train()
        set_rng_state(state)


def _coverage_counts(model: nn.Module) -> dict[str, int]:
    """{"boxes_without_positive": gt boxes of this process's last batch that no anchor at IoU >= fg_iou was given
    to} as the model counted them (retinanet.anchor_tools), or {} for a model that does not count."""
    count = getattr(model, "boxes_without_positive", None)
    return {} if count is None else {"boxes_without_positive": int(count)}


def _to_device(batch: tuple[list[Tensor], list[dict[str, Any]]], device: torch.device) -> tuple[list, list]:
    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


# ------------------------------------------------------------------------------------------------------------------
# optimiser and learning-rate schedule


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
    plan = cfg.schedule()
    schedule = functools.partial(
        lr_factor, warmup_iters=plan.warmup_iters, warmup_factor=cfg.warmup_factor, steps=plan.steps,
        cosine_iters=cfg.max_iters if cfg.lr_schedule == "cosine" else None,
    )  # fmt: skip
    return LambdaLR(optimizer, schedule)


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


# ------------------------------------------------------------------------------------------------------------------
# data stream


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


# ------------------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    iteration: int = 0,
    train_config: TrainConfig | Mapping[str, Any] | None = None,
    data_position: Mapping[str, int] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    fast_paths: fastpath.RunFastPaths | None = None,
) -> Path:
    """Write a checkpoint atomically: to a temporary file in the same folder, flushed and fsynced, then renamed
    over `path`, so that a crash during the save leaves the previous checkpoint at `path` intact.

    Keys: format_version, iteration, model (state dict), model_config (dataclasses.asdict(model.config)),
    train_config, optimizer, scheduler, scaler (state dicts or None), rng (one rng_state() per process, by rank),
    data_position ({"epoch", "batch"}), extra, fast_paths (the run's machine-dependent choices,
    fastpath.RunFastPaths as a dict, or None). Every value loads with torch.load(weights_only=True).
    """
    model = getattr(model, "module", model)  # DistributedDataParallel -> the model
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(train_config):
        train_config = dataclasses.asdict(train_config)
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "train_config": dict(train_config) if train_config is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states if rng_states is not None else [rng_state()],
        "data_position": dict(data_position) if data_position is not None else None,
        "extra": dict(extra or {}),
        "fast_paths": fast_paths.to_dict() if fast_paths is not None else None,
    }
    path = Path(path)
    _atomic_save(checkpoint, path)
    return path


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (POSIX; not possible on Windows)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (safely: weights_only=True) and check its format_version.

    Raises FileNotFoundError for a missing file and ValueError naming the file for anything that is not such a
    checkpoint (a partial or corrupt file, a bare state dict) or has an unknown format_version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        hint = " (it looks like a bare state dict)" if isinstance(checkpoint, dict) else ""
        raise ValueError(f"{path}: not a RetinaNet training checkpoint: no 'format_version' key{hint}")
    version = checkpoint["format_version"]
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {version!r} is not supported; this code reads "
                         f"version {FORMAT_VERSION}")
    return checkpoint


def load_model(path: str | Path, map_location: str | torch.device | None = "cpu", **overrides: Any) -> RetinaNet:
    """The model a checkpoint was saved from, rebuilt from its own model_config (with `overrides` of any of its
    fields, e.g. min_size), with its weights."""
    checkpoint = load_checkpoint(path, map_location)
    if checkpoint["model_config"] is None:
        raise ValueError(f"{path}: the checkpoint holds no model_config to build the model from")
    # the weights come from the checkpoint: the files (or downloads) the model was initialised from are not needed
    saved = {**checkpoint["model_config"], "backbone_weights": None, "init_from": None}
    config = ModelConfig.from_dict(saved, where=f"{path}: model_config")
    model = build_from_config(apply_overrides(config, overrides, "model overrides"))
    model.load_state_dict(checkpoint["model"])
    return model


def _checkpoint(out: Path, model: nn.Module, optimizer, scheduler, scaler, iteration: int, cfg: TrainConfig,
                stream: BatchStream, rank: int, world: int, fast: fastpath.RunFastPaths) -> None:
    rngs = _gather(rng_state(), world)  # collective: every process must call it
    if rank != 0:
        return
    args = (model, optimizer, scheduler, scaler, iteration, cfg, stream.position, rngs)
    save_checkpoint(out / "last.pt", *args, fast_paths=fast)
    if cfg.keep_all_checkpoints:
        save_checkpoint(out / f"iter_{iteration:07d}.pt", *args, fast_paths=fast)


def _restore(checkpoint: dict[str, Any], path: str | Path, model: nn.Module, optimizer, scheduler, scaler) -> None:
    """Load a checkpoint's model, optimiser, schedule and scaler states into the given objects."""
    saved = checkpoint["model_config"]
    config = getattr(model, "config", None)
    if saved is not None and dataclasses.is_dataclass(config):
        differ = sorted(k for k, v in dataclasses.asdict(config).items() if k in saved and _plain_value(saved[k]) != _plain_value(v))
        if differ:
            warnings.warn(f"resuming from {path}: the model config differs in {differ}", stacklevel=3)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])  # moves the state onto the parameters' device
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])


def _plain_value(v: Any) -> Any:
    return [_plain_value(x) for x in v] if isinstance(v, (list, tuple)) else v


# ------------------------------------------------------------------------------------------------------------------
# random generators


def rng_state() -> dict[str, Any]:
    """This process's generator states: python, numpy (as plain lists), torch CPU, and every CUDA device."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore_rng(states: list[dict[str, Any]], rank: int, world: int) -> None:
    if len(states) != world:
        warnings.warn(f"the checkpoint holds random states of {len(states)} processes, this run has {world}: "
                      "random augmentations will differ from an uninterrupted run", stacklevel=3)
        return
    set_rng_state(states[rank])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------------
# processes and devices


def init_distributed() -> tuple[int, int, int]:
    """Join the process group when launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment):
    NCCL with this process's GPU pinned when CUDA is available, Gloo otherwise. Call before building the loader.
    Returns (rank, world_size, local_rank); (0, 1, 0) when not launched that way."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=rank, world_size=world)  # MASTER_ADDR/PORT from torchrun
    return rank, world, local_rank


class LossModule(nn.Module):
    """model.loss as forward(): DistributedDataParallel's hooks (gradient all-reduce, buffer broadcast) apply only
    to calls of forward, and RetinaNet's forward gives head outputs, not losses."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.model.loss(images, targets, resize=False)


def _loss_module(model: RetinaNet, device: torch.device, world: int) -> nn.Module:
    module = LossModule(model)
    if world == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def resolve_device_and_amp(cfg: TrainConfig) -> tuple[torch.device, str]:
    """The device and the precision to run in ("none", "bf16", "fp16"; amp "auto" resolved by measurement, or the
    cache's choice). A training run makes this choice in `train` instead (fastpath.begin_run), once for all its
    processes."""
    device = resolve_device(cfg)
    return device, fastpath.choose_amp(cfg.amp, device)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device to run on; a ValueError for one this machine lacks, or for a precision it cannot run (measures
    nothing)."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train config: device {name!r} but this machine has no CUDA GPU that torch can use; set "
                         "train.device=cpu (or auto)")  # fmt: skip
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # init_distributed pinned this process's GPU
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError(f"train config: amp='fp16' needs a CUDA device, got {device}; use amp='none' on a CPU")
    try:
        fastpath.check_amp(cfg.amp, device)
    except ValueError as exc:
        raise ValueError(f"train config: {exc}") from None
    return device


def _check_batch_size(loader: DataLoader, cfg: TrainConfig, world: int) -> None:
    per_process = getattr(loader, "batch_size", None)
    if per_process is not None and per_process * world != cfg.batch_size:
        warnings.warn(f"the loader gives {per_process} images x {world} process(es) per iteration but "
                      f"cfg.batch_size is {cfg.batch_size}: cfg.lr = {cfg.lr} may not suit the real batch size",
                      stacklevel=3)


# ------------------------------------------------------------------------------------------------------------------
# logging


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
