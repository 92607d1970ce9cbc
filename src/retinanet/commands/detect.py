"""`retinanet detect`: objects in images, folders, globs and list files, by a checkpoint, torchvision's COCO
weights or an exported ONNX model (retinanet.inference.files writes the outputs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from retinanet.config import size_overrides
from retinanet.deploy import OnnxPredictor
from retinanet.inference import (
    InferenceResult,
    Predictor,
    categories_of,
    check_tta,
    draw_mode,
    image_files,
    run_inference,
)
from retinanet.model import load_model
from retinanet.runtime.device import resolve_device
from retinanet.runtime.outputs import claim_detect_folder, remove_stale
from retinanet.weights import load_torchvision_coco

__all__ = ["main", "run_detect"]


def run_detect(
    inputs: Sequence[str | Path],
    output: str | Path,
    checkpoint: str | Path | None = None,
    torchvision_weights: str | None = None,
    score_thresh: float = 0.3,
    device: str = "auto",
    min_size: int | None = None,
    max_size: int | None = None,
    skip_bad: bool = False,
    onnx: str | Path | None = None,
    engine: str = "onnxruntime",
    tile: int | None = None,
    overlap: float = 0.2,
    batch_size: int = 4,
    workers: int = 0,
    csv_file: bool = False,
    draw: bool | str = True,
    overwrite: bool = False,
    tta: str | None = None,
    yolo_txt: bool = False,
    max_detections: int | None = None,
    allow_large: bool = False,
) -> InferenceResult:
    """Detect objects in image files, folders, globs and list files (retinanet.inference) with a checkpoint of ours
    (resized as it was evaluated, or by min_size / max_size), torchvision's COCO weights by name, or an exported
    ONNX file run by `engine`; in tiles of `tile` px when it is given. Writes an annotated PNG per image (draw:
    True or "auto", "labels", "boxes"; False or "none": none), detections.json (every image: box XYXY pixels,
    score, label, category_id, name), results.json (COCO results), with csv_file detections.csv, and with yolo_txt
    labels/NAME.txt (Ultralytics' layout). An unreadable file stops the run naming it, or with skip_bad is reported
    and skipped. An earlier detection's files in `output` are refused, or with `overwrite` replaced: kept until
    this detection has written its own (retinanet.runtime.outputs). tta: test-time augmentation's views
    (retinanet.inference.tta; PyTorch models only). max_detections: the model's cap of detections per image (per
    tile, in tiles), in place of its own. allow_large: decode whole an image past Pillow's limit that cannot be
    read by windows (retinanet.inference.rasters). Returns the InferenceResult (its counts; records read back)."""
    if sum(x is not None for x in (checkpoint, torchvision_weights, onnx)) != 1:
        raise ValueError("give one of: a checkpoint, torchvision weights by name, an ONNX file")
    if check_tta(tta) is not None and onnx is not None:
        raise ValueError("detect --tta runs the PyTorch model several times; it is not available with --onnx")
    draw_mode(draw)  # a wrong mode stops us first
    if max_detections is not None and onnx is not None:
        raise ValueError(
            "--max-detections: an ONNX graph keeps the cap it was exported with; export the checkpoint "
            "again with --max-detections"
        )
    if max_detections is not None and max_detections < 1:
        raise ValueError(f"--max-detections {max_detections}: expected a positive number of detections per image")
    files = image_files(inputs)
    earlier = claim_detect_folder(output, overwrite)
    device = resolve_device(device)
    sizes = size_overrides(min_size, max_size) | ({"detections_per_image": max_detections} if max_detections else {})
    options = {"score_thresh": score_thresh, "tile": tile, "overlap": overlap, "batch_size": batch_size}
    if onnx is not None:
        predictor: Predictor = OnnxPredictor(onnx, engine, **sizes, **options)
    elif checkpoint is not None:
        model = load_model(checkpoint, map_location=device, **sizes)
        predictor = Predictor(model, categories_of(model), device=device, tta=tta, **options)
    else:
        model, categories = load_torchvision_coco(torchvision_weights, **sizes)
        predictor = Predictor(model, categories, device=device, tta=tta, **options)
    result = run_inference(
        predictor,
        files,
        output,
        batch_size,
        workers,
        skip_bad,
        csv_file,
        draw,
        yolo_txt=yolo_txt,
        allow_large=allow_large,
    )
    remove_stale(earlier, result.written)  # the earlier detection's files that this one did not write again
    return result


def main(args: argparse.Namespace) -> int:
    result = run_detect(
        args.inputs,
        args.output,
        args.checkpoint,
        args.torchvision,
        args.score_thresh,
        args.device,
        skip_bad=args.skip_bad,
        onnx=args.onnx,
        engine=args.engine,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        workers=args.workers,
        csv_file=args.csv,
        draw="none" if args.no_draw else args.draw,
        overwrite=args.overwrite,
        tta=args.tta,
        yolo_txt=args.yolo_txt,
        max_detections=args.max_detections,
        allow_large=args.allow_large_images,
        **size_overrides(args.min_size, args.max_size),
    )
    print(
        f"{result.detections} detections in {result.images} images; detections.json, results.json (COCO) in "
        f"{args.output}"
    )
    return 0
