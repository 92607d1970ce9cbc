"""`retinanet export`: a checkpoint as an ONNX graph (float32, and INT8), checked against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from retinanet.config import RunConfig, load_run_config, size_overrides
from retinanet.data import build_dataset, val_dataset
from retinanet.deploy import (
    ExportReport,
    compare_engines,
    export_onnx,
    int8_path,
    quantize_int8,
    sample_images,
    verify_export,
)
from retinanet.inference import categories_of, read_image
from retinanet.model import RetinaNet, load_model
from retinanet.runtime.outputs import writable_folder

__all__ = ["main", "run_export"]


def run_export(
    checkpoint: str | Path,
    output: str | Path,
    opset: int = 18,
    image_size: Sequence[int] | None = None,
    check_images: Sequence[str | Path] | None = None,
    int8: RunConfig | None = None,
    calibration_images: int = 200,
    **model_overrides: Any,
) -> ExportReport:
    """Export a checkpoint to ONNX (retinanet.deploy: dynamic size, or the fixed padded `image_size` (H, W)) and
    check the file: onnx.checker, and ONNX Runtime's detections against PyTorch's on `check_images` (default: two
    synthetic images of two sizes), each alone and both in one batch. With `int8` (a run config whose data
    calibrates it) also the INT8 model, output.int8.onnx (retinanet.deploy.quantize), its detections compared with
    the float32 export's. Returns the ExportReport."""
    writable_folder(Path(output).parent, "exported model")
    model = load_model(checkpoint, map_location="cpu", **model_overrides)
    images = [read_image(p) for p in check_images] if check_images else None  # bad files stop us before exporting
    calibration = _calibration_images(int8, model, calibration_images) if int8 is not None else None
    export_onnx(model, output, opset, tuple(image_size) if image_size else None)
    report = verify_export(model, output, images)
    if calibration is not None:
        quantized = quantize_int8(output, int8_path(output), model.config, calibration)
        report.int8 = (quantized, compare_engines(output, quantized, images or sample_images(model.config)))
    return report


def _calibration_images(cfg: RunConfig, model: RetinaNet, count: int) -> list:
    """Up to `count` images of the run's validation set (else its training set), spread over it, as uint8 [3, H, W]
    tensors: what INT8 quantization calibrates its activation ranges on."""
    known = categories_of(model) if model.config.class_names else None  # the images matter here, not the labels
    train_set = build_dataset(cfg.data, model.config, "train", train_mode=False, categories=known)
    dataset = val_dataset(cfg.data, model.config, train_set.categories) or train_set
    sample = dataset.subset(count)
    return [
        read_image(r.path) if r.path is not None else _pixels(sample.load_image(i))
        for i, r in enumerate(sample.records)
    ]


def _pixels(image: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def main(args: argparse.Namespace) -> int:
    if args.int8 and not args.calibration:
        raise ValueError("export --int8 needs --calibration RUN.yaml, the run config whose images calibrate it")

    int8 = load_run_config(args.calibration) if args.int8 else None
    thresh = {"score_thresh": args.score_thresh} if args.score_thresh is not None else {}
    thresh |= {"detections_per_image": args.max_detections} if args.max_detections is not None else {}
    overrides = {**size_overrides(args.min_size, args.max_size), **thresh}
    report = run_export(
        args.checkpoint,
        args.output,
        args.opset,
        args.image_size,
        args.check_images,
        int8,
        args.calibration_images,
        **overrides,
    )
    print(report.describe())
    if not report.ok:
        raise ValueError(f"{args.output}: the exported model's detections differ from PyTorch's (above)")
    print(f"exported to {args.output}; ONNX checker passed, detections as PyTorch's")
    return 0
