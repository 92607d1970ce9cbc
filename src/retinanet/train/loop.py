"""The training loop.

`train` is one readable loop, as nanoGPT's: batch -> model.loss -> finite check -> backward -> (clip) -> step ->
log / evaluate / checkpoint; `_setup` prepares what it needs (seeds, the resumed state, the run's fast paths, DDP,
the optimiser). Ctrl-C stops it after the current iteration with a checkpoint (TrainingInterrupted); a second
Ctrl-C stops it at once. A run can be stopped and resumed exactly (retinanet.train.resume): with the same seed, a
resumed run logs the same losses as one that was never stopped (exactly so on CPU with num_workers=0; with worker
processes the data order is still exact but the workers' random augmentations restart from their seeds).

Launched by `torchrun`, call `init_distributed()` first and build the loader with a DistributedSampler
(`make_loader(..., distributed=True)`); `train` then wraps the model in DistributedDataParallel and only rank 0
writes logs, checkpoints and the progress bar.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from retinanet.config import TrainConfig
from retinanet.model import RetinaNet
from retinanet.model.checkpoint import rng_state, save_checkpoint, set_rng_state
from retinanet.runtime import fastpath
from retinanet.train.budget import TimeBudget
from retinanet.train.distributed import check_batch_size, rank_and_world, train_device, wrap_for_ddp
from retinanet.train.ema import build_ema, ema_state, load_ema_state
from retinanet.train.log import Progress, RunLog
from retinanet.train.optim import build_optimizer, build_scheduler, fit_schedule
from retinanet.train.resume import Resume, checkpoint_run, open_resume, restore_rng, restore_run, seed_everything
from retinanet.train.stream import BatchStream

__all__ = ["NonFiniteLossError", "SELECTION", "TrainingInterrupted", "train"]

EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# the metric an evaluation may give to choose best.pt by, when it weighs several validation sets (retinanet.train.run)
SELECTION = "selection"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the loss, the iteration and the value."""


class TrainingInterrupted(RuntimeError):
    """Training stopped at Ctrl-C (SIGINT) or SIGTERM after iteration `iteration`, with a checkpoint at
    `checkpoint`; `signal` is the one that stopped it."""

    def __init__(self, iteration: int, checkpoint: Path, signal_number: int = signal.SIGINT):
        super().__init__(f"interrupted after iteration {iteration}; checkpoint saved to {checkpoint}")
        self.iteration, self.checkpoint, self.signal = iteration, checkpoint, int(signal_number)


# ------------------------------------------------------------------------------------------------------------------
def train(
    model: RetinaNet,
    train_loader: DataLoader,
    cfg: TrainConfig,
    output_dir: str | Path | None = None,
    eval_fn: EvalFn | None = None,
    resume: str | Path | Resume | None = None,
) -> dict[str, Any]:
    """Train `model` for cfg.max_iters iterations (optimiser steps), from scratch or from the checkpoint `resume`.

    train_loader yields (images, targets): images a list of float [3, H, W] tensors in [0, 1], already resized
        (the loss is called with resize=False); targets per image {"boxes": [N, 4] float XYXY pixels,
        "labels": [N] int64, ...}. It is read as an endless stream of epochs.
    eval_fn(model, iteration) -> {metric: value} runs every cfg.eval_every iterations and at the end, in eval
        mode and on every process (so that it can shard the evaluation); its metrics are logged as "eval/<name>".
    Writes to output_dir (default cfg.output_dir), from rank 0 only: log.jsonl (one line per cfg.log_every
    iterations: iter, each loss and "loss" (their sum) of that iteration on rank 0, lr, time and data_time in
    seconds), tb/ (TensorBoard), train.log (notes, the run's fast paths), last.pt (atomic checkpoints every
    cfg.checkpoint_every iterations and at the end) and best.pt (the evaluated weights at the best cfg.best_metric).
    With cfg.ema_decay a moving average of the weights is kept (retinanet.train.ema): it is what eval_fn sees, what
    best.pt holds, and what inference loads from last.pt.
    Returns {"iteration", "losses" (last logged), "metrics" (last evaluation), "checkpoint" (path of last.pt),
    "fast_paths" (the run's fastpath.RunFastPaths: precision, layout, convolution algorithms)}.
    Seeds python, numpy and torch with cfg.seed + rank first, so that a run is a function of its seed.
    Raises NonFiniteLossError, before the optimiser step, when a loss is NaN or infinite.
    """
    r = _setup(model, train_loader, cfg, output_dir, resume)
    amp_dtype = AMP_DTYPES[r.fast.amp]
    bar = Progress(cfg.max_iters, r.start, enabled=r.rank == 0)
    t_start, t_eval, values, metrics, it = time.perf_counter(), 0.0, {}, {}, r.start
    try:
        with _StopOnInterrupt() as stop:
            while it < cfg.max_iters:  # train.minutes may move max_iters as it goes (r.fit_length)
                it, tic = it + 1, time.perf_counter()
                images, targets = r.next_batch()
                data_time = time.perf_counter() - tic
                with torch.autocast(r.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = r.loss_fn(images, targets)
                total = sum(losses.values())
                stopping, due = _check_finite(
                    losses, total, it, r.world > 1, r.out / "last.pt", stop.requested, r.checkpoint_due(cfg)
                )
                r.optimizer.zero_grad(set_to_none=True)
                r.scaler.scale(total).backward()
                if cfg.grad_clip is not None:
                    r.scaler.unscale_(r.optimizer)  # clip the true gradients, not fp16-scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr = r.optimizer.param_groups[0]["lr"]
                r.scaler.step(r.optimizer)
                r.scaler.update()
                r.scheduler.step()
                if r.ema is not None:
                    r.ema.update_parameters(model)
                bar.update()
                r.fit_length(it, time.perf_counter() - t_start - t_eval, cfg, bar)
                last = it == cfg.max_iters
                if it % cfg.log_every == 0 or last or stopping:
                    values = {k: v.item() for k, v in losses.items()} | {"loss": total.item()}
                    timing = {"lr": lr, "time": time.perf_counter() - tic, "data_time": data_time}
                    r.log.write(it, values | timing | _coverage_counts(model))
                    bar.show(values, lr)
                if eval_fn is not None and ((cfg.eval_every and it % cfg.eval_every == 0) or last):
                    t_eval -= time.perf_counter()
                    metrics = _evaluate(r.evaluated(model), eval_fn, it)
                    t_eval += time.perf_counter()
                    r.log.write(it, {f"eval/{k}": v for k, v in metrics.items()})
                    r.keep_best(model, it, metrics, cfg)
                if it % cfg.checkpoint_every == 0 or last or stopping or due:
                    r.checkpoint(model, it, cfg, time.perf_counter() - t_start - t_eval)
                if stopping and not last:
                    r.log.note(f"{stop.reason}: stopped after iteration {it}; checkpoint {r.out / 'last.pt'}")
                    raise TrainingInterrupted(it, r.out / "last.pt", stop.signal)
    finally:
        bar.close()
        r.finish(bar.n, time.perf_counter() - t_start - t_eval, t_eval)
    result = {"iteration": max(r.start, cfg.max_iters), "losses": values, "metrics": metrics}
    return result | {"checkpoint": r.out / "last.pt", "fast_paths": r.fast}


@dataclass
class _Run:
    """What the loop needs, made by `_setup`."""

    out: Path
    device: torch.device
    rank: int
    world: int
    start: int
    stream: BatchStream
    first: tuple[list[Tensor], list[dict[str, Any]]] | None
    log: RunLog
    fast: fastpath.RunFastPaths
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    best: dict[str, Any]  # {"metric", "value", "iteration"} of the best evaluation so far, or {}
    budget: TimeBudget | None  # train.minutes
    saved_at: float = field(default_factory=time.monotonic)  # when the last checkpoint was written

    def next_batch(self) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """The first batch (already taken for the fast paths), then the stream's, on the device."""
        batch, self.first = self.first, None
        return batch if batch is not None else _to_device(self.stream.next(), self.device)

    def evaluated(self, model: RetinaNet) -> RetinaNet:
        """The model that is evaluated and kept: the moving average when the run keeps one."""
        return self.ema.module if self.ema is not None else model

    def fit_length(self, iteration: int, elapsed: float, cfg: TrainConfig, bar: Progress) -> None:
        """With train.minutes, max_iters (and the schedule's length) set from the speed measured so far."""
        if self.budget is None:
            return
        new = self.budget.check(iteration, elapsed, cfg.max_iters, self.device if self.world > 1 else None)
        if new is not None:
            cfg.max_iters = bar.total = new
            fit_schedule(self.scheduler, cfg)
            self.log.note(
                f"train.minutes {cfg.minutes:g}: {self.budget.used(elapsed) / 60:.1f} min spent at iteration "
                f"{iteration}; the run now ends at iteration {new}",
                echo=False,
            )

    def keep_best(self, model: RetinaNet, iteration: int, metrics: Mapping[str, Any], cfg: TrainConfig) -> None:
        """best.pt (rank 0) when the evaluation's selection score (`SELECTION`: best_metric, weighed over the
        validation sets) or else its best_metric beats the best so far."""
        weighed = SELECTION in metrics
        value = metrics.get(SELECTION if weighed else cfg.best_metric)
        if not isinstance(value, (int, float)) or value != value or value <= self.best.get("value", float("-inf")):
            return
        name = f"{cfg.best_metric} weighed over the validation sets" if weighed else cfg.best_metric
        self.best = {"metric": name, "value": float(value), "iteration": iteration}
        if self.rank == 0:
            save_checkpoint(
                self.out / "best.pt",
                self.evaluated(model),
                iteration=iteration,
                train_config=cfg,
                extra={"best": self.best},
                fast_paths=self.fast,
            )
            self.log.note(f"best.pt: {name} {value:.4f} at iteration {iteration}", echo=False)

    def checkpoint_due(self, cfg: TrainConfig) -> bool:
        """Whether cfg.checkpoint_minutes have passed since the last checkpoint (rank 0's clock: under DDP every
        process checkpoints when rank 0 says so)."""
        if cfg.checkpoint_minutes is None or self.rank != 0:
            return False
        return time.monotonic() - self.saved_at >= 60 * cfg.checkpoint_minutes

    def checkpoint(self, model: RetinaNet, iteration: int, cfg: TrainConfig, elapsed: float) -> None:
        """last.pt, with the training seconds spent so far (train.minutes continues from them on resume)."""
        self.saved_at = time.monotonic()
        spent = self.budget.used(elapsed) if self.budget is not None else None
        checkpoint_run(
            self.out,
            model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            iteration,
            cfg,
            self.stream,
            self.rank,
            self.world,
            self.fast,
            ema_state(self.ema),
            self.best,
            spent,
        )

    def finish(self, reached: int, seconds: float, eval_seconds: float) -> None:
        if reached > self.start:
            self.log.note(
                f"trained iterations {self.start + 1}..{reached} in {seconds:.1f} s (evaluation not "
                f"counted: {eval_seconds:.1f} s)",
                echo=False,
            )
        else:  # a resumed run that had already ended
            self.log.note(
                f"nothing left to train: the checkpoint had reached iteration {self.start}, the run's end "
                "(raise train.max_iters or train.minutes to train on)"
            )
        self.log.note(f"at the end: {self.fast.describe()}", echo=False)  # with the classes met after the start
        self.log.close()


def _setup(
    model: RetinaNet,
    loader: DataLoader,
    cfg: TrainConfig,
    output_dir: str | Path | None,
    resume: str | Path | Resume | None,
) -> _Run:
    """Seeds, the resumed state, the run's fast paths (once, before DDP compares the replicas), DDP, the optimiser,
    the schedule and the logs."""
    rank, world = rank_and_world()
    cfg.check()
    device = train_device(cfg)
    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    seed_everything(cfg.seed + rank)
    check_batch_size(loader, cfg, world)
    model.to(device).train()
    start, position, checkpoint = 0, {"epoch": 0, "batch": 0}, None
    if resume is not None:
        resume = open_resume(resume, cfg)  # read and checked here, unless the caller did (run_train)
        checkpoint = resume.checkpoint
        start, position = checkpoint["iteration"], checkpoint["data_position"] or position
        if cfg.minutes is not None:  # the length train.minutes had reached, before the schedule is built on it
            cfg.max_iters = int((checkpoint["train_config"] or {}).get("max_iters", cfg.max_iters))
    stream = BatchStream(loader, cfg.seed, **position)
    if checkpoint is not None:  # only now: replaying the epoch's consumed batches above drew random numbers
        restore_rng(checkpoint["rng"], rank, world)
    log = RunLog(out, enabled=rank == 0, start=start)
    first = _to_device(stream.next(), device) if start < cfg.max_iters else None
    saved = checkpoint.get("fast_paths") if checkpoint is not None else None
    fast, notes = fastpath.begin_run(model, first, cfg.amp, device, saved, rank, world)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=fast.amp == "fp16")
    ema = build_ema(model, cfg.ema_decay)
    best: dict[str, Any] = {}
    extra = checkpoint["extra"] if checkpoint is not None else {}
    if checkpoint is not None:
        restore_run(checkpoint, resume.path, model, optimizer, scheduler, scaler)
        load_ema_state(ema, checkpoint.get("ema"), model)
        best = dict(extra.get("best", {}))
    spent = float(extra.get("train_seconds") or 0.0)
    if resume is not None:
        resume.checkpoint.clear()  # restored: its weights and optimiser state are not held for the whole run
    budget = TimeBudget(60 * cfg.minutes, spent, start) if cfg.minutes is not None else None
    for line in [f"warning: {w}" for w in cfg.schedule().warnings] + notes + [fast.describe()]:
        log.note(line)
    loss_fn = wrap_for_ddp(model, device, world)
    return _Run(
        out,
        device,
        rank,
        world,
        start,
        stream,
        first,
        log,
        fast,
        loss_fn,
        optimizer,
        scheduler,
        scaler,
        ema,
        best,
        budget,
    )


class _StopOnInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM (what `timeout`, Docker, Kubernetes and SLURM send) during training: the first asks
    the loop to stop after the current iteration, which then saves a checkpoint; a second raises KeyboardInterrupt
    at once. Only the main thread can own the handlers."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self) -> None:
        self.requested = False
        self.signal, self.reason = signal.SIGINT, "Ctrl-C"
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal, self.reason = True, signum, self.SIGNALS.get(signum, f"signal {signum}")
        tqdm.write(
            f"retinanet: {self.reason}: stopping after this iteration to save a checkpoint (again to quit at once)"
        )

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _check_finite(
    losses: dict[str, Tensor],
    total: Tensor,
    iteration: int,
    distributed: bool,
    last: Path,
    stop_requested: bool = False,
    checkpoint_due: bool = False,
) -> tuple[bool, bool]:
    """Raise NonFiniteLossError naming every non-finite loss, on all processes at once under DDP; return (whether a
    stop (Ctrl-C, SIGTERM) was requested on any process, whether a time-based checkpoint is due on any)."""
    # One host-device sync per iteration: we must know before the optimiser step, or NaN reaches the weights. Under
    # DDP the stop requests and rank 0's checkpoint clock travel in the same all-reduce, so that every process stops
    # or checkpoints after the same iteration.
    flags = torch.stack(
        [
            (~torch.isfinite(total.detach())).float(),
            total.new_tensor(float(stop_requested)),
            total.new_tensor(float(checkpoint_due)),
        ]
    )
    if distributed:  # all stop together, rather than the healthy ones waiting forever in the next all-reduce
        dist.all_reduce(flags)
    bad, stop, due = flags.tolist()
    if bad == 0:
        return stop > 0, due > 0
    named = [f"{k} = {v.item()}" for k, v in losses.items() if not torch.isfinite(v)]
    which = ", ".join(named) if named else ("the sum of the losses" if not distributed else "on another process")
    finite = ", ".join(f"{k} = {v.item():.4g}" for k, v in losses.items() if torch.isfinite(v))
    raise NonFiniteLossError(
        f"non-finite loss at iteration {iteration}: {which}"
        + (f" (finite: {finite})" if finite else "")
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
    to} as the model counted them (retinanet.ops.matching.anchor_counts), or {} for a model that does not count."""
    count = getattr(model, "boxes_without_positive", None)
    return {} if count is None else {"boxes_without_positive": int(count)}


def _to_device(batch: tuple[list[Tensor], list[dict[str, Any]]], device: torch.device) -> tuple[list, list]:
    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets
