"""Deployment on this CPU: RetinaNet ResNet-50-FPN at 800 px in PyTorch (torchvision's and ours), ONNX Runtime and
OpenVINO, in one run; and tiled inference on a 4,000 x 4,000 image against SAHI.

Engines. One set of weights for every row: torchvision's retinanet_resnet50_fpn (v1: frozen BatchNorm, P6 from
P5, 80 classes) with random weights and the class bias zeroed so that inference does its full work (top-k,
decoding, NMS; an untrained head scores everything under the threshold), and ours built from it by
`retinanet.from_torchvision` with our fast paths (frozen BatchNorm folded, Winograd 3x3 convolutions and the
memory layout chosen by measurement), exported by `retinanet.deploy` (dynamic batch and size; decoding and NMS in
the graph) and run by ONNX Runtime and OpenVINO (CPU, float32). Images: `--batch` synthetic images of 800 x 1067
(4:3 at the model's size: no resizing in any row). Rows: images per second, median over --repeats rounds after a
warm-up, each round timing every row once in turn (rotating order); each row's detections compared with ours in
PyTorch (same label, boxes within 0.5 px, scores within 1e-3). Lever rows: a graph exported for the fixed padded
size, ONNX Runtime without spinning threads, OpenVINO's THROUGHPUT hint. Target: ONNX Runtime or OpenVINO at least
2x torchvision, with identical detections.

Tiles. A model trained by `retinanet demo` (runs/demo/last.pt; trained first when missing) on 128 px synthetic
scenes, and a --tile-image px square mosaic of such scenes (ground truth known; many objects cut by tile
borders). Ours: `Predictor(tile=128, overlap=0.2)`, 4 tiles per forward pass and 1 (as SAHI calls a model); SAHI:
`get_sliced_prediction` with the same model on 128 px slices, overlap 0.2, its default merge (GREEDYNMM, IOS 0.5), no
full-image pass (at 4000 -> 128 px it finds nothing). Reported: time (median of --tile-repeats), COCO AP against the
ground truth, objects found (IoU >= 0.5), duplicates, partial boxes (a box of a piece of an object), and how many boxes
the two share (IoU >= 0.9).

    python benchmarks/bench_deploy.py [--repeats 5] [--batch 1] [--size 800] [--tile-image 4000]
                                      [--tile-checkpoint runs/demo/last.pt] [--quick] [--no-write]

--quick: a smoke test (2 rounds, 512 px, 1000 px mosaic, a short-trained tile model), not a measurement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import spread_scores, torchvision_model  # noqa: E402
from common import interleaved_median_times, machine_line, write_section  # noqa: E402

from retinanet import from_torchvision  # noqa: E402
from retinanet.data import SyntheticShapes  # noqa: E402
from retinanet.deploy.engines import OnnxPredictor
from retinanet.deploy.graph import export_onnx
from retinanet.deploy.parity import compare_detections  # noqa: E402
from retinanet.deploy.quantize import int8_path, quantize_int8
from retinanet.evaluation import evaluate_coco  # noqa: E402
from retinanet.inference.predictor import Predictor, categories_of  # noqa: E402
from retinanet.ops.postprocess import Detections  # noqa: E402
from retinanet.runtime import fastpath  # noqa: E402

NUM_CLASSES = 80


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _versions() -> str:
    import importlib.metadata as md

    found = [f"{n} {md.version(n)}" for n in ("onnxruntime", "openvino", "sahi") if _installed(n)]
    return ", ".join(found) or "no engines installed"


def _images(n: int, height: int, width: int, seed: int = 3) -> list[torch.Tensor]:
    scenes = SyntheticShapes("val", num_images=n, image_size=(height, width), seed=seed)
    return [torch.from_numpy(np.asarray(scenes.load_image(i).convert("RGB")).copy()).permute(2, 0, 1) for i in range(n)]


def _as_detections(predictions) -> list[Detections]:
    return [Detections(p.boxes, p.scores, p.labels) for p in predictions]


def engine_rows(args, workdir: Path) -> str:
    """The speed table at args.size px and each row's agreement with ours in PyTorch."""
    height, width = args.size, round(args.size * 4 / 3)
    torch.manual_seed(0)
    tv = torchvision_model(NUM_CLASSES, args.size).eval()
    tv.transform.min_size, tv.transform.max_size = (args.size,), max(1333, width)
    spread_scores(tv)
    ours = from_torchvision(tv, fold_frozen_bn=True, conv_algorithm="auto", memory_format="auto").eval()
    cfg = ours.config
    images = _images(args.batch, height, width)
    floats = [im.float() / 255 for im in images]
    eager = Predictor(ours, batch_size=args.batch, amp="none")  # float32, as the exported graphs

    print(f"exporting to ONNX in {workdir} (a minute or two) ...", flush=True)
    dynamic = export_onnx(ours, workdir / "r50.onnx")
    padded = tuple(-(-s // cfg.size_divisible) * cfg.size_divisible for s in (height, width))
    fixed = export_onnx(ours, workdir / "r50_fixed.onnx", image_size=padded)

    def tv_run():
        with torch.no_grad():
            return [Detections(o["boxes"], o["scores"], o["labels"]) for o in tv(floats)]

    rows = [
        ("torchvision RetinaNet, PyTorch eager", tv_run),
        (
            "ours, PyTorch eager (the defaults: fast paths measured on this machine)",
            lambda: _as_detections(eager.predict(images)),
        ),
    ]
    engines = [("onnxruntime", "ONNX Runtime", {}), ("openvino", "OpenVINO", {})]
    levers = [
        ("onnxruntime", "ONNX Runtime, fixed-size graph", {}, fixed),
        ("openvino", "OpenVINO, fixed-size graph", {}, fixed),
        ("onnxruntime", "ONNX Runtime, threads not spinning", {"spinning": False}, dynamic),
        ("openvino", "OpenVINO, THROUGHPUT hint", {"hint": "THROUGHPUT"}, dynamic),
    ]
    missing = []
    if _installed("onnxruntime"):  # INT8: the convolutions quantized, calibrated on images like the benchmark's
        quantized = quantize_int8(dynamic, int8_path(dynamic), cfg, _images(8, height, width, seed=7))
        levers.append(("onnxruntime", "ONNX Runtime, INT8 (QDQ convolutions)", {}, quantized))
    for engine, name, options, path in [(e, f"ours, {n}", o, dynamic) for e, n, o in engines] + levers:
        if not _installed(engine):
            missing.append(engine)
            continue
        runner = OnnxPredictor(path, engine, batch_size=args.batch, engine_options=options)  # the graph's threshold
        rows.append((name, lambda r=runner: _as_detections(r.predict(images))))
    reference = rows[1][1]()
    agreement = [
        compare_detections(reference, fn(), score_thresh=cfg.score_thresh, limit=cfg.detections_per_image)
        for _, fn in rows
    ]
    print("timing ...", flush=True)
    times = interleaved_median_times([fn for _, fn in rows], args.repeats)
    per_second = [args.batch / t for t in times]
    lines = [
        f"ResNet-50-FPN (torchvision's v1 architecture and weights in every row, random, class bias zeroed), "
        f"{args.batch} image(s) of {height} x {width} per call, {NUM_CLASSES} classes, float32; images/s = "
        f"batch / median time of {args.repeats} rounds. Engines: {_versions()}.",
        "",
        "| row | images/s | vs torchvision | detections vs ours in PyTorch |",
        "|---|---:|---:|---|",
    ]
    for (name, _), ips, a in zip(rows, per_second, agreement):
        same = "identical" if a.identical else ("same up to cut-offs" if a.ok else "DIFFER")
        lines.append(f"| {name} | {ips:.2f} | {ips / per_second[0]:.2f}x | {same}: {a.describe()} |")
    main_rows = [
        (n, ips, a)
        for (n, _), ips, a in zip(rows, per_second, agreement)
        if n in ("ours, ONNX Runtime", "ours, OpenVINO")
    ]
    if main_rows:
        best = max(main_rows, key=lambda r: r[1])
        met = best[1] >= 2 * per_second[0] and best[2].identical
        lines += [
            "",
            f"Target (ONNX Runtime or OpenVINO at least 2x torchvision eager, identical detections): "
            f"{'met' if met else 'MISSED'} ({best[0].split(', ')[1]}: {best[1] / per_second[0]:.2f}x).",
        ]
    names = [n for n, _ in rows]
    if "ONNX Runtime, INT8 (QDQ convolutions)" in names:
        fp32 = per_second[names.index("ours, ONNX Runtime")]
        int8 = per_second[names.index("ONNX Runtime, INT8 (QDQ convolutions)")]
        vnni = fastpath.cpu_info().flags & {"avx512_vnni", "avx_vnni"}
        lines += [
            "",
            f"INT8 against the float32 engine (ONNX Runtime): {int8 / fp32:.2f}x the images per second on "
            f"this CPU ({'with ' + ', '.join(sorted(vnni)) if vnni else 'no VNNI'}); target at least 2x where "
            f"the CPU has VNNI: {'met' if int8 >= 2 * fp32 else 'MISSED'}. Its detections are those of "
            "random weights with near-tied scores, where 8 bits reorder many: accuracy is in the next table.",
        ]
    if missing:
        lines += [
            "",
            f"Not installed, rows left out: {', '.join(sorted(set(missing)))} (pip install 'retinanet[bench]').",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# the small-data recipe's run (benchmarks/bench_small_data.py): as written (amp: auto), else float32's or bf16's
RECIPE_RUN = next(
    (
        p
        for p in (Path(f"runs/small_data/recipe_{amp}") for amp in ("auto", "none", "bf16"))
        if (p / "best.pt").is_file()
    ),
    Path("runs/small_data/recipe_auto"),
)


def int8_accuracy(workdir: Path, models: dict[str, tuple[Path, Path]]) -> str:
    """AP of the float32 export and of its INT8 version on validation sets: {name: (checkpoint, run config)}, both
    run by ONNX Runtime and scored by our COCO evaluation; the INT8 model is calibrated on up to 200 of the
    config's validation images."""
    from retinanet.commands.export import run_export
    from retinanet.config import load_run_config

    lines = ["| model, validation set | float32 AP | INT8 AP | float32 AP50 | INT8 AP50 |", "|---|---:|---:|---:|---:|"]
    for name, (checkpoint, config) in models.items():
        if not checkpoint.is_file():
            lines.append(f"| {name} | (no {checkpoint}: run its benchmark first) | | | |")
            continue
        cfg = load_run_config(config)
        path = workdir / f"{checkpoint.parent.name}.onnx"
        run_export(checkpoint, path, int8=cfg)
        scores = [_onnx_ap(model, cfg) for model in (path, int8_path(path))]
        lines.append(
            f"| {name} | {scores[0].AP:.3f} | {scores[1].AP:.3f} | {scores[0].AP50:.3f} | {scores[1].AP50:.3f} |"
        )
    return "\n".join(lines)


def _onnx_ap(path: Path, cfg):
    """COCO metrics of an exported model, run by ONNX Runtime, on the config's validation set."""
    from retinanet.data import val_dataset
    from retinanet.inference import read_image

    runner = OnnxPredictor(path)  # the model's score_thresh, baked in the graph: what our evaluation keeps
    dataset = val_dataset(cfg.data, runner.config, runner.categories)
    gts, dets = [], []
    for i, record in enumerate(dataset.records):
        image = (
            read_image(record.path)
            if record.path is not None
            else torch.from_numpy(np.asarray(dataset.load_image(i)).copy()).permute(2, 0, 1)
        )
        found = runner.predict_tensors([image])[0]
        dets.append({"image_id": record.image_id, "boxes": found.boxes, "scores": found.scores, "labels": found.labels})
        gts.append(
            {
                "image_id": record.image_id,
                "boxes": record.boxes,
                "labels": record.labels,
                "iscrowd": record.iscrowd,
                "width": image.shape[-1],
                "height": image.shape[-2],
            }
        )
    return evaluate_coco(gts, dets, dataset.categories)


def tile_model(args):
    from retinanet.model.checkpoint import load_model

    path = Path(args.tile_checkpoint)
    if not path.is_file():
        from retinanet.commands.demo import demo_config
        from retinanet.train.run import run_train

        overrides = {"max_iters": 300, "checkpoint_every": 300} if args.quick else {}
        print(
            f"{path} not found: training the demo model there first{' (short: --quick)' if args.quick else ''}",
            flush=True,
        )
        run_train(demo_config(path.parent, **overrides), evaluate=False)
    return load_model(path).eval()


def mosaic(side: int, cell: int, seed: int = 11) -> tuple[torch.Tensor, Detections]:
    """A side x side uint8 image made of cell x cell synthetic scenes, and its objects (score 1)."""
    per_row = -(-side // cell)
    scenes = SyntheticShapes("val", num_images=per_row * per_row, image_size=(cell, cell), seed=seed)
    image = torch.zeros(3, per_row * cell, per_row * cell, dtype=torch.uint8)
    boxes, labels = [], []
    for i, record in enumerate(scenes.records):
        y, x = (i // per_row) * cell, (i % per_row) * cell
        pixels = np.asarray(scenes.load_image(i).convert("RGB"))
        image[:, y : y + cell, x : x + cell] = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        boxes.append(torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4) + torch.tensor([x, y, x, y]))
        labels.append(torch.as_tensor(record.labels, dtype=torch.int64).reshape(-1))
    boxes_all, labels_all = torch.cat(boxes), torch.cat(labels)
    inside = (boxes_all[:, 2] <= side) & (boxes_all[:, 3] <= side)
    truth = Detections(boxes_all[inside], torch.ones(int(inside.sum())), labels_all[inside])
    return image[:, :side, :side].contiguous(), truth


class _SahiModel:
    """Our Predictor as a SAHI DetectionModel (made on first use: SAHI is imported only here)."""

    @staticmethod
    def make(predictor: Predictor):
        from sahi.models.base import DetectionModel
        from sahi.prediction import ObjectPrediction

        class OurModel(DetectionModel):
            def load_model(self):
                self.model = predictor

            def set_model(self, model, **kwargs):
                self.model = model

            def perform_inference(self, image: np.ndarray) -> None:
                self._original_predictions = self.model.predict(np.ascontiguousarray(image))

            def _create_object_prediction_list_from_original_predictions(
                self, shift_amount_list=[[0, 0]], full_shape_list=None
            ):
                found = self._original_predictions
                shift = shift_amount_list[0] if shift_amount_list else [0, 0]
                shape = None if full_shape_list is None else full_shape_list[0]
                self._object_prediction_list_per_image = [
                    [
                        ObjectPrediction(
                            bbox=box,
                            category_id=int(label),
                            category_name=str(int(label)),
                            score=score,
                            shift_amount=shift,
                            full_shape=shape,
                        )
                        for box, score, label in zip(found.boxes.tolist(), found.scores.tolist(), found.labels.tolist())
                    ]
                ]

        mapping = {str(i): c["name"] for i, c in enumerate(predictor.categories)}
        return OurModel(confidence_threshold=predictor.score_thresh, category_mapping=mapping, device="cpu")


def _sahi_run(sahi_model, image_np: np.ndarray, tile: int, overlap: float) -> Detections:
    from sahi.predict import get_sliced_prediction

    result = get_sliced_prediction(
        image_np,
        sahi_model,
        slice_height=tile,
        slice_width=tile,
        overlap_height_ratio=overlap,
        overlap_width_ratio=overlap,
        perform_standard_pred=False,
        postprocess_type="GREEDYNMM",
        postprocess_match_metric="IOS",
        postprocess_match_threshold=0.5,
        verbose=0,
    )
    preds = result.object_prediction_list
    boxes = torch.tensor([p.bbox.to_xyxy() for p in preds], dtype=torch.float32).reshape(-1, 4)
    return Detections(boxes, torch.tensor([p.score.value for p in preds]), torch.tensor([p.category.id for p in preds]))


def _found(truth: Detections, d: Detections) -> dict[str, int]:
    """Objects found (a box of its class at IoU >= 0.5), duplicates (more such boxes of one object), partial
    boxes (IoU < 0.5 with every object of the class, but at least 80% inside one: a piece of it), and others."""
    same = truth.labels[:, None] == d.labels[None]
    iou = box_iou(truth.boxes, d.boxes) * same
    hits = iou >= 0.5
    inter_w = (
        torch.minimum(truth.boxes[:, None, 2], d.boxes[None, :, 2])
        - torch.maximum(truth.boxes[:, None, 0], d.boxes[None, :, 0])
    ).clamp(min=0)
    inter_h = (
        torch.minimum(truth.boxes[:, None, 3], d.boxes[None, :, 3])
        - torch.maximum(truth.boxes[:, None, 1], d.boxes[None, :, 1])
    ).clamp(min=0)
    area = ((d.boxes[:, 2] - d.boxes[:, 0]) * (d.boxes[:, 3] - d.boxes[:, 1])).clamp(min=1e-6)
    inside = (inter_w * inter_h / area[None]) * same >= 0.8
    matched_box = hits.any(0)
    partial = ~matched_box & inside.any(0)
    return {
        "found": int(hits.any(1).sum()),
        "duplicates": int((hits.sum(1) - 1).clamp(min=0).sum()),
        "partial": int(partial.sum()),
        "other": int((~matched_box & ~partial).sum()),
        "boxes": len(d.scores),
    }


def tiled_rows(args) -> str:
    model = tile_model(args)
    tile = model.config.min_size
    thresh, overlap = 0.3, 0.2
    image, truth = mosaic(args.tile_image, tile)
    ours = Predictor(model, score_thresh=thresh, tile=tile, overlap=overlap, batch_size=4)
    one_by_one = Predictor(model, score_thresh=thresh, tile=tile, overlap=overlap, batch_size=1)
    rows = [
        ("ours: Predictor(tile, overlap), 4 tiles per pass", lambda: ours.predict(image)),
        ("ours: Predictor(tile, overlap), 1 tile per pass (as SAHI runs a model)", lambda: one_by_one.predict(image)),
    ]
    if _installed("sahi"):
        sahi_model = _SahiModel.make(Predictor(model, score_thresh=thresh, batch_size=1))
        image_np = image.permute(1, 2, 0).numpy().copy()
        rows.append(
            (
                "SAHI get_sliced_prediction (GREEDYNMM, IOS 0.5), same model",
                lambda: _sahi_run(sahi_model, image_np, tile, overlap),
            )
        )
    print(f"tiled: {args.tile_image} px mosaic, {len(truth.scores)} objects, tiles of {tile} px ...", flush=True)
    results = [fn() for _, fn in rows]
    results = [Detections(r.boxes, r.scores, r.labels) for r in results]
    times = interleaved_median_times([fn for _, fn in rows], args.tile_repeats, warmup=0)
    categories = categories_of(model)
    gts = [
        {
            "image_id": 1,
            "boxes": truth.boxes,
            "labels": truth.labels,
            "width": args.tile_image,
            "height": args.tile_image,
        }
    ]
    lines = [
        f"Model: `retinanet demo` ({Path(args.tile_checkpoint)}, {model.config.backbone}, "
        f"trained on {tile} px scenes); "
        f"image: {args.tile_image} x {args.tile_image} px mosaic of {tile} px synthetic scenes, {len(truth.scores)} "
        f"objects; tiles of {tile} px, overlap {overlap}, score >= {thresh}. Time: median of {args.tile_repeats}.",
        "",
        "| method | time (s) | COCO AP | AP50 | objects found | duplicates | partial boxes | other boxes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, _), t, d in zip(rows, times, results):
        metrics = evaluate_coco(
            gts,
            [{"image_id": 1, "boxes": d.boxes, "scores": d.scores, "labels": d.labels}],
            categories,
            max_dets=max(100, len(d.scores)),
        )
        c = _found(truth, d)
        lines.append(
            f"| {name} | {t:.1f} | {metrics.AP:.3f} | {metrics.AP50:.3f} | {c['found']} / {len(truth.scores)} "
            f"| {c['duplicates']} | {c['partial']} | {c['other']} |"
        )
    if len(results) == 3:
        a, b = results[0], results[2]
        same = (box_iou(a.boxes, b.boxes) >= 0.9) & (a.labels[:, None] == b.labels[None])
        lines += [
            "",
            f"Boxes in common (same class, IoU >= 0.9): {int(same.any(1).sum())} of ours' {len(a.scores)} "
            f"and SAHI's {len(b.scores)}.",
        ]
    else:
        lines += ["", "SAHI is not installed (pip install 'retinanet[bench]'): no comparison."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--size", type=int, default=800, help="shorter side (images are size x 4/3 size)")
    parser.add_argument("--tile-image", type=int, default=4000, help="side of the tiled image")
    parser.add_argument("--tile-repeats", type=int, default=3)
    parser.add_argument("--tile-checkpoint", default="runs/demo/last.pt")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 rounds, 512 px, a 1000 px mosaic")
    parser.add_argument("--skip-engines", action="store_true")
    parser.add_argument("--skip-tiles", action="store_true")
    parser.add_argument("--skip-int8", action="store_true", help="skip INT8 accuracy on the demo and real data")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.size, args.tile_image, args.tile_repeats = 2, 512, 1000, 1
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_engines:
            parts.append(engine_rows(args, Path(tmp)))
            print(parts[-1], flush=True)
        if not args.skip_int8:
            parts.append(
                "INT8 accuracy (the same export's float32 and INT8 graphs, ONNX Runtime, our COCO evaluation):"
                "\n\n"
                + int8_accuracy(
                    Path(tmp),
                    {
                        "the demo model, synthetic validation split": (
                            Path("runs/demo/last.pt"),
                            Path("runs/demo/config.yaml"),
                        ),
                        "the small-data recipe, real development set (held-out strip)": (
                            RECIPE_RUN / "best.pt",
                            RECIPE_RUN / "config.yaml",
                        ),
                    },
                )
            )
            print(parts[-1], flush=True)
    if not args.skip_tiles:
        parts.append(tiled_rows(args))
        print(parts[-1], flush=True)
    else:
        parts.append("Tiles against SAHI: not measured in this run (--skip-tiles).")
    text = "\n\n".join(parts) + f"\n\nMachine: {machine_line()}."
    if not args.no_write and not args.quick:
        write_section(
            "deploy-cpu",
            "## Deployment on the CPU: ONNX Runtime and OpenVINO against PyTorch; tiles against SAHI\n\n" + text,
        )


if __name__ == "__main__":
    main()
