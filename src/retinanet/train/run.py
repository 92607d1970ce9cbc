"""A training run from its RunConfig: datasets, model, loader, the loop, the run's own evaluation and its files."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from retinanet.config import PRESETS, ModelConfig, RunConfig, apply_overrides, save_run_config
from retinanet.data import (
    DetectionDataset,
    build_dataset,
    categories_config,
    eval_transforms,
    make_loader,
    val_datasets,
)
from retinanet.evaluation import evaluate_model, selection_score, validate, validation_lines
from retinanet.model import RetinaNet, build_from_config
from retinanet.runtime import fastpath
from retinanet.runtime.machine import busy_processes, set_threads
from retinanet.runtime.outputs import claim_run_folder, remove, write_json
from retinanet.tools.anchor_coverage import coverage, coverage_lines, training_boxes
from retinanet.train.distributed import init_distributed, per_process_batch, rank_and_world, train_device
from retinanet.train.log import plot_training_curves, write_note
from retinanet.train.loop import SELECTION, train
from retinanet.train.resume import open_resume
from retinanet.weights import init_from

__all__ = ["check_learnable", "memorising", "run_train", "train_set_subset", "write_skipped"]


def run_train(
    cfg: RunConfig, resume: str | Path | None = None, evaluate: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Train as `cfg` says: saves config.yaml, train.log, log.jsonl, tb/, last.pt, training_curves.png (and with
    validation sets: evaluation every train.eval_every iterations and at the end, on each of them and on a fixed
    sample of the training images, eval/ results (eval/<name>/ for data.extra_val's sets), the last evaluation's
    reports in eval/report/ (and eval/<name>/report/) and best.pt, chosen on the sets' weighted best_metric) in
    cfg.train.output_dir.

    Everything that can be checked is checked before anything is written: the output folder (another run's is
    refused unless `resume` continues it or `overwrite` replaces it), the config, every image's header and boxes,
    the checkpoint to resume from, the device and precision. The model is built after seeding, so that a run is a
    function of its config and seed."""
    threads = set_threads()  # before anything is measured: torchrun's ranks share the cores
    init_distributed()  # joins the process group when launched by torchrun; a no-op otherwise
    rank, world = rank_and_world()
    out = Path(cfg.train.output_dir)
    resume, overwrite, resume_line = resolve_resume(resume or cfg.train.resume, out, overwrite)
    earlier = claim_run_folder(out, resume, overwrite) if rank == 0 else []
    device = train_device(cfg.train)  # a device or precision this machine lacks stops us first
    train_set = build_dataset(cfg.data, cfg.model, "train", train_mode=True)
    check_learnable(cfg, train_set)
    cfg.model = categories_config(cfg.model, train_set)
    cfg.model, cap_line = detection_cap(cfg.model, train_set)
    val_sets = val_datasets(cfg.data, cfg.model, train_set.categories) if evaluate else {}
    val_set = next(iter(val_sets.values()), None)
    if val_sets:  # a best_weights naming no validation set stops the run here
        selection_score({}, list(val_sets), cfg.train.best_metric, cfg.train.best_weights)
    if resume is not None:  # a missing or unreadable checkpoint, or one of another batch size, stops the run here
        resume = open_resume(resume, cfg.train)  # read once: the loop takes it as it is
    workers, workers_warning = cfg.train.workers()
    torch.manual_seed(cfg.train.seed)  # the model's initial weights are part of the run
    model = build_from_config(cfg.model)
    init_lines = _init_weights(model, resume.path if resume is not None else None)
    per_process = per_process_batch(cfg.train.batch_size, world)  # an uneven split stops the run here
    check_enough_images(len(train_set), per_process, world, cfg.train.batch_size)
    loader = make_loader(
        train_set,
        per_process,
        shuffle=True,
        num_workers=workers,
        seed=cfg.train.seed,
        distributed=world > 1,
        drop_last=True,
    )
    if rank == 0:  # the run will start: now its folder is written
        remove(earlier)  # --overwrite: the earlier run's files, now that this run's checks have passed
        save_run_config(cfg, out / "config.yaml")
        write_skipped(out, {"train": train_set, **val_sets})
        boxes = training_boxes(train_set.records, model.config, one_size_each=True)  # seconds
        precision = fastpath.choose_amp(cfg.train.amp, device)  # rank 0's choice: the one every process will take
        summary = _summary(cfg, train_set, val_sets, device, workers, precision, threads)
        for line in [
            resume_line,
            summary,
            busy_line(),
            workers_warning,
            cap_line,
            *init_lines,
            *coverage_lines(coverage(boxes, model.config)),
        ]:
            if line:
                print(line, flush=True)
                write_note(out, line)

    seen = train_set_subset(cfg, train_set) if val_set is not None and cfg.train.eval_train_images else None

    def evaluate_sets(evaluated: RetinaNet, iteration: int) -> dict[str, Any]:  # the model or its moving average
        if rank != 0:
            return {}
        amp = model.fast_paths.amp  # the precision the run trains in (its fast paths, set at its first batch)
        last = iteration == cfg.train.max_iters  # the run's last evaluation writes its reports too
        metrics = validate(evaluated, val_sets, out / "eval", amp, report=cfg.train.report and last)
        lines = validation_lines(metrics, list(val_sets), iteration)
        if len(val_sets) > 1:
            metrics[SELECTION] = selection_score(metrics, list(val_sets), cfg.train.best_metric, cfg.train.best_weights)
        if seen is not None:  # the same model on training images it has learnt from
            on_seen = evaluate_model(evaluated, seen, amp=amp)
            metrics |= {"train_AP": on_seen.AP, "train_AP50": on_seen.AP50}
            lines += memorising(metrics, iteration)
        for line in lines:
            print(line, flush=True)
            write_note(out, line)
        return metrics

    t0 = time.perf_counter()
    result = train(model, loader, cfg.train, out, eval_fn=evaluate_sets if val_sets else None, resume=resume)
    result["train_seconds"] = time.perf_counter() - t0
    if rank == 0 and (out / "log.jsonl").exists():
        plot_training_curves(out / "log.jsonl", out / "training_curves.png")
    result["model"] = model
    return result


def _init_weights(model: RetinaNet, resume: str | Path | None) -> list[str]:
    """model.init_from applied to `model` (retinanet.weights.init_from), as log lines; not when resuming, whose
    checkpoint holds the weights."""
    if model.config.init_from is None:
        return []
    if resume is not None:
        return [f"init_from {model.config.init_from}: not applied, the weights come from {resume}"]
    return init_from(model).lines()


def _summary(
    cfg: RunConfig,
    train_set: DetectionDataset,
    val_sets: dict[str, DetectionDataset],
    device: torch.device,
    workers: int,
    precision: str,
    threads: str = "",
) -> str:
    """One line saying what the run will do; threads: this process's intra-op threads, in words."""
    t, m = cfg.train, cfg.model
    epochs = t.max_iters * t.batch_size / max(len(train_set), 1)
    val = ", ".join(f"{len(v)} ({k})" for k, v in val_sets.items())
    val = {0: ", no validation set", 1: f", {sum(map(len, val_sets.values()))} validation images"}.get(
        len(val_sets), f", validation images {val}"
    )
    sizes = "" if m.training_sizes == (m.min_size,) else f" (training: drawn from {list(m.training_sizes)})"
    length = (
        f"{t.max_iters} iterations of {t.batch_size} images = {epochs:.1f} epochs"
        if t.minutes is None
        else f"{t.minutes:g} minutes of training in iterations of {t.batch_size} images (the length set from the "
        "measured speed)"
    )
    return (
        f"run: {len(train_set)} training images ({cfg.data.format}, {m.num_classes} classes){val}; "
        f"{length}; images resized to shorter side {m.min_size}, longer at most {m.max_size}{sizes}; "
        f"{cfg.preset} {m.backbone}; lr {t.lr:g} ({t.optimizer}), {t.schedule().describe()}; device {device}, "
        f"{_precision(t.amp, precision)}, {workers} data workers"
        f"{', ' + threads + ' per process' if threads and device.type == 'cpu' else ''}; output {t.output_dir}"
    )


def _precision(asked: str, chosen: str) -> str:
    """The precision the run trains in, in words: "amp none (float32)", "amp auto: bf16"."""
    name = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}[chosen]
    return f"amp {asked} ({name})" if asked == chosen else f"amp {asked}: {chosen} ({name})"


def train_set_subset(cfg: RunConfig, train_set: DetectionDataset) -> DetectionDataset:
    """A fixed sample of cfg.train.eval_train_images training images with the evaluation transforms: evaluated beside
    the validation set, its gap to it says how far the model learns its data by heart."""
    plain = train_set.subset(cfg.train.eval_train_images)  # the same records: nothing read or reported twice
    plain.transforms = eval_transforms(cfg.model.min_size, cfg.model.max_size)
    plain.mosaic = 0.0
    return plain


def memorising(metrics: dict[str, Any], iteration: int, gap: float = 0.25, ratio: float = 2.0) -> list[str]:
    """A warning line when training AP is far above validation AP (more than `gap` above it and `ratio` times it):
    the model is learning its training images by heart."""
    val, seen = metrics.get("AP"), metrics.get("train_AP")
    if not isinstance(val, float) or not isinstance(seen, float) or val != val or seen != seen:
        return []
    if seen - val <= gap or seen <= ratio * max(val, 0.0):
        return []
    return [
        f"warning: at iteration {iteration} the training images' AP ({seen:.3f}) is far above the validation "
        f"AP ({val:.3f}): the model is learning its training images by heart. More varied data, stronger "
        "augmentation (data.augment: top_down for top-down imagery), a moving average of the weights "
        "(train.ema_decay), fewer iterations or pretrained weights help; best.pt keeps the best validation AP"
    ]


def write_skipped(out: Path, datasets: dict[str, DetectionDataset | None]) -> None:
    """skipped.json in the run's folder: what skip_bad left out of its datasets (split, file, index, reason, and
    whether an image or a box was dropped)."""
    skipped = [
        {"split": split, **skip.to_dict()} for split, ds in datasets.items() if ds is not None for skip in ds.skipped
    ]
    if skipped:
        write_json(out / "skipped.json", skipped)


def busy_line() -> str | None:
    """One line where other processes compute on this machine as the run starts (None where it is quiet)."""
    others = busy_processes()
    if not others:
        return None
    return (
        f"the machine is busy: {others} other process(es) computing on its {os.cpu_count()} cores. This run "
        "shares them (its threads wait without spinning), so it runs slower than alone; the fast paths it "
        "measures now are measured again once the machine is quiet"
    )


def resolve_resume(resume: str | Path | None, out: Path, overwrite: bool) -> tuple[Path | None, bool, str | None]:
    """(the checkpoint to resume from, whether the folder's earlier files are replaced, the line that says what
    "auto" chose). resume "auto": out/last.pt where it exists, else a fresh run; the files of an earlier start that
    saved no checkpoint are then replaced (nothing of it is lost)."""
    if resume is None or str(resume) != "auto":
        return (Path(resume) if resume is not None else None), overwrite, None
    last = out / "last.pt"
    if last.is_file():
        return last, overwrite, f"resume auto: continuing from {last}"
    return None, True, f"resume auto: no checkpoint in {out}, a fresh run"


def detection_cap(model: ModelConfig, train_set: DetectionDataset) -> tuple[ModelConfig, str | None]:
    """The model config with its cap of detections per image raised where a training image holds more objects than
    it (left at its default: a dense scene would otherwise be capped in every evaluation and detection), and the
    line that says so (or that an explicit cap is below the data); (model, None) where the cap holds them all."""
    most = max((int((~r.iscrowd).sum()) for r in train_set.records), default=0)
    cap = model.detections_per_image
    if most <= cap:
        return model, None
    if cap != ModelConfig.detections_per_image:
        return model, (
            f"warning: a training image holds {most} objects, more than model.detections_per_image = "
            f"{cap}: evaluation and detection stop at {cap} per image"
        )
    raised = 100 * math.ceil(1.5 * most / 100)
    return apply_overrides(model, {"detections_per_image": raised}), (
        f"detection cap: a training image holds {most} objects, more than the default model.detections_per_image "
        f"= {cap}: raised to {raised} (set the key to choose)"
    )


def check_enough_images(images: int, per_process: int, world: int, batch_size: int) -> None:
    """One line, before anything is written, for a training set that cannot fill one batch (whole batches only:
    the loader drops a last, smaller one), with both numbers and a batch size that works."""
    if images // world >= per_process:
        return
    fits = max(1, images // world) * world
    share = f" ({images // world} per process of {world})" if world > 1 else ""
    raise ValueError(
        f"the training set has {images} image(s){share}, fewer than one batch of train.batch_size = "
        f"{batch_size}: add images, or set train.batch_size={fits}"
    )


def check_learnable(cfg: RunConfig, train_set: DetectionDataset) -> None:
    """One line, before anything is written, for a training set with nothing to learn from, and for a
    model.num_classes the data contradicts (training takes the number of classes from the data)."""
    if sum(len(r.boxes) for r in train_set.records) == 0:
        raise ValueError(
            f"data config: the training set ({cfg.data.format}, {len(train_set)} images) has no boxes at "
            "all: there is nothing to learn from; check the annotation file's 'annotations' (or lines)"
        )
    preset_classes = PRESETS[cfg.preset].num_classes if cfg.preset in PRESETS else None
    if cfg.model.num_classes not in (preset_classes, train_set.num_classes):
        raise ValueError(
            f"model config: num_classes = {cfg.model.num_classes} but the training data has "
            f"{train_set.num_classes} classes ({', '.join(train_set.category_names[:10])}): leave "
            "model.num_classes out, it is taken from the data"
        )
