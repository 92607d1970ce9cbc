"""RetinaNet with the focal loss: train detectors on your own images, evaluate, detect, export and analyse them.

    retinanet train --config run.yaml --set train.max_iters=2000 model.gamma=1.0 [--resume runs/x/last.pt]
    retinanet eval --checkpoint runs/x/last.pt --config run.yaml --output runs/x/eval [--report]
    retinanet report --detections results.json --annotations instances.json --images val/ --output report/
    retinanet detect --checkpoint runs/x/last.pt images/ photo.jpg --output runs/x/detect
    retinanet detect --torchvision retinanet_resnet50_fpn photo.jpg --output out/
    retinanet detect --onnx model.onnx "scans/*.tif" list.txt --tile 800 --overlap 0.2 --csv [--engine openvino]
    retinanet export --checkpoint runs/x/last.pt --output model.onnx [--opset 18] [--image-size H W | --dynamic]
                     [--int8 --calibration run.yaml]
    retinanet demo [--output runs/demo]
    retinanet anchors --config run.yaml --output runs/anchors [--fit]   (which boxes the anchors miss; anchors that fit)
    retinanet inspect --config run.yaml --output runs/inspect [--split val] [--augment] [--show-anchors]
    retinanet fastpaths [--reset]                            (this machine's measured fast paths, with their figures)
    retinanet analyze loss-curves --output docs/figures       (Figures 1, 5, 6 of the paper: PNG and CSV)
    retinanet analyze examples --p 0.95 0.05 0.99 0.01         (CE, balanced CE and FL at each p)
    retinanet analyze loss-cdf --checkpoint runs/x/last.pt --config run.yaml --output runs/x/loss_cdf  (Figure 4)
    retinanet ablate --grid a b d --config run.yaml --output runs/ablate   (Tables 1 and 3: a grid of runs)

Every option's help shows its default. Defaults are the config's where an option sets a config value; where one
differs (detect's --score-thresh), its help says why.

Bad input (a missing or corrupt image, a bad box, an unknown category, a malformed file or config key, a download
that fails offline) ends the command with one line naming the file and the index, and exit status 2; a non-finite
loss with status 3. Ctrl-C (or SIGTERM, as `timeout`, Docker, Kubernetes and SLURM send) during training saves a
checkpoint and says how to resume (status 130, or 143 for SIGTERM).

This module is the parser of every command; each runs in its module of retinanet.commands (its job beside its
handler), imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

__all__ = ["main"]

# the commands import torch, torchvision and the package: only once one runs, so that `--help` answers at once


# ------------------------------------------------------------------------------------------------------------------
class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help; descriptions as written."""


def _command(sub, name: str, handler: str | tuple[str, str], help: str) -> argparse.ArgumentParser:
    """A command's parser; handler: its module in retinanet.commands (whose `main` runs it), or (module, function)."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
    p.set_defaults(handler=(handler, "main") if isinstance(handler, str) else handler)
    return p


def _config_options(p: argparse.ArgumentParser, what: str = "run config YAML (sections model, data, train)") -> None:
    p.add_argument("--config", help=what)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override config values, e.g. train.max_iters=200 model.gamma=1.0",
    )


def _size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-size", type=int, help="shorter side to resize to (None: the checkpoint's model.min_size)")
    p.add_argument("--max-size", type=int, help="cap on the longer side (None: the checkpoint's model.max_size)")


def _tta_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        choices=["flips", "turns", "d4"],
        help="test-time augmentation: detect in several views "
        "(flips: 3, turns by 90 degrees: 4, d4: all 8) and fuse their boxes by score-weighted averaging; "
        "costs that many passes (None: one pass)",
    )


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N (as train.device)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retinanet", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = _command(sub, "train", "train", "train a model (config YAML + overrides); torchrun for several processes")
    _config_options(t)
    t.add_argument(
        "--resume",
        help="checkpoint to continue from exactly, or auto: the output folder's last.pt where "
        "there is one, else a fresh run (for torchrun --max-restarts and preemptible nodes)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the output folder (its "
        "files are removed once this run's checks pass); without it such a folder is refused",
    )
    t.add_argument(
        "--skip-bad", action="store_true", help="drop bad images and boxes instead of stopping (data.skip_bad)"
    )

    e = _command(sub, "eval", "evaluate", "COCO AP of a checkpoint on the validation data of a config")
    e.add_argument("--checkpoint", required=True, help="a checkpoint written by `retinanet train`")
    _config_options(
        e, "run config YAML giving the data section (and train.amp); None: the config.yaml of the checkpoint's run"
    )
    e.add_argument("--output", default="runs/eval", help="folder for metrics.json, detections.json, pr_curves.png")
    _device_option(e)
    e.add_argument("--skip-bad", action="store_true", help="drop bad images and boxes instead of stopping")
    e.add_argument(
        "--report",
        action="store_true",
        help="also OUTPUT/report/index.html: the errors by type (TIDE), "
        "a gallery of the images with the most errors and a score-threshold control",
    )
    _tta_option(e)
    _size_options(e)

    r = _command(
        sub,
        "report",
        ("evaluate", "report_main"),
        "the evaluation report of detections made anywhere (COCO results) against "
        "COCO annotations: errors by type, gallery, threshold control",
    )
    r.add_argument("--detections", required=True, help="COCO results JSON: [{image_id, category_id, bbox, score}]")
    r.add_argument("--annotations", required=True, help="COCO annotations JSON of the same images")
    r.add_argument("--images", help="the images' folder (None: the gallery draws boxes on blank images)")
    r.add_argument("--output", default="runs/report", help="folder for index.html, errors.json, images/")

    d = _command(
        sub,
        "detect",
        "detect",
        "detect objects in images, folders, globs or list files; writes JSON (COCO "
        "results too), annotated images, optionally CSV",
    )
    d.add_argument(
        "inputs", nargs="+", help="image files, folders, glob patterns or list files (.txt, one path a line)"
    )
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by `retinanet train`")
    src.add_argument(
        "--torchvision",
        help="torchvision's COCO weights by name, retinanet_resnet50_fpn[_v2] "
        "(downloaded once), or a downloaded checkpoint file of either",
    )
    src.add_argument("--onnx", help="a model written by `retinanet export`, run by --engine")
    d.add_argument(
        "--engine",
        default="onnxruntime",
        choices=["onnxruntime", "openvino"],
        help="what runs --onnx (openvino: pip install 'retinanet[openvino]')",
    )
    d.add_argument("--output", default="runs/detect", help="folder for detections.json, results.json, drawings")
    d.add_argument(
        "--score-thresh",
        type=float,
        default=0.3,
        help="least score written and drawn; above the model's "
        "score_thresh (0.05), which keeps low scores because they raise AP in evaluation, so that the "
        "files and drawings hold the confident detections",
    )
    _device_option(d)
    d.add_argument("--skip-bad", action="store_true", help="report unreadable images by name and go on")
    d.add_argument(
        "--tile",
        type=int,
        help="detect in tiles of TILE x TILE px, merged across tile borders (large images; None: whole images)",
    )
    d.add_argument("--overlap", type=float, default=0.2, help="share of a tile that neighbouring tiles overlap")
    d.add_argument("--batch-size", type=int, default=4, help="images (or tiles) per forward pass")
    d.add_argument("--workers", type=int, default=2, help="processes decoding and resizing images (0: none)")
    d.add_argument("--csv", action="store_true", help="also write detections.csv in keras-retinanet's layout")
    d.add_argument(
        "--yolo-txt",
        action="store_true",
        help="also write labels/NAME.txt in Ultralytics' layout (class cx cy w h score, fractions of the image)",
    )
    d.add_argument(
        "--draw",
        choices=("auto", "labels", "boxes", "none"),
        default="auto",
        help="annotated images: "
        "boxes with their class and score (labels), boxes alone (boxes), none, or labels while they stay "
        "readable and boxes alone in dense scenes (auto)",
    )
    d.add_argument("--no-draw", action="store_true", help="write no annotated images (as --draw none)")
    d.add_argument(
        "--allow-large-images",
        action="store_true",
        help="decode whole an image past Pillow's "
        "decompression-bomb limit that cannot be read by windows (TIFFs are, with rasterio: the geo "
        "extra); its memory is then width x height x 3 bytes",
    )
    d.add_argument(
        "--max-detections",
        type=int,
        default=None,
        help="the cap of detections per image (per tile with "
        "--tile) in place of the model's (model.detections_per_image, 100 by default)",
    )
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier detection's files in the output folder; without it such a folder is refused",
    )
    _tta_option(d)
    _size_options(d)

    x = _command(
        sub,
        "export",
        "export",
        "export a checkpoint to ONNX (detections decoded and NMS'd in the graph), "
        "checked against PyTorch with ONNX Runtime",
    )
    x.add_argument("--checkpoint", required=True, help="a checkpoint written by `retinanet train`")
    x.add_argument("--output", required=True, help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 or later")
    size = x.add_mutually_exclusive_group()
    size.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="a fixed padded input size (multiples of 32; None: any size)",
    )
    size.add_argument("--dynamic", action="store_true", help="any input size (what no --image-size gives)")
    x.add_argument(
        "--check-images", nargs="*", default=None, help="images for the parity check (None: two synthetic images)"
    )
    x.add_argument(
        "--int8",
        action="store_true",
        help="also write OUTPUT.int8.onnx: the convolutions quantized to "
        "INT8 (ONNX Runtime static quantization, QDQ), decoding and NMS in float32",
    )
    x.add_argument(
        "--calibration",
        help="with --int8: the run config whose validation (else training) images calibrate the INT8 ranges",
    )
    x.add_argument("--calibration-images", type=int, default=200, help="most calibration images")
    x.add_argument(
        "--max-detections",
        type=int,
        default=None,
        help="the graph's cap of detections per image (default: the model's)",
    )
    x.add_argument(
        "--score-thresh",
        type=float,
        default=None,
        help="the least score the graph keeps (default: the "
        "checkpoint's score_thresh); a predictor of the file cannot go below it",
    )
    _size_options(x)

    m = _command(sub, "demo", "demo", "train the small preset on synthetic shapes, evaluate, draw (a few minutes)")
    m.add_argument("--output", default="runs/demo", help="folder of the demo's run")
    m.add_argument("--set", nargs="*", default=[], metavar="train.KEY=VALUE", help="override the demo's training")

    a = _command(
        sub,
        "anchors",
        "anchors",
        "how many training boxes get an anchor at IoU >= fg_iou, by size and "
        "aspect ratio (JSON, PNG); --fit: anchors that fit the data, as config overrides",
    )
    _config_options(a, "run config YAML (model and data sections)")
    a.add_argument("--output", default="runs/anchors", help="folder for anchors.json, anchors.png, anchors_fit.yaml")
    a.add_argument("--fit", action="store_true", help="search anchor sizes, scales and ratios for the most coverage")
    a.add_argument("--max-anchors", type=int, default=9, help="most anchors per location the fit may use (A)")

    i = _command(
        sub,
        "inspect",
        "inspect",
        "images after the transforms with each box coloured by its anchors, and the data's statistics",
    )
    _config_options(i, "run config YAML (model and data sections)")
    i.add_argument("--output", default="runs/inspect", help="folder for images/, stats.json, stats.png")
    i.add_argument("--split", choices=("train", "val"), default="train", help="which split to draw")
    i.add_argument("--augment", action="store_true", help="the training transforms: random sizes and flips")
    i.add_argument("--show-anchors", action="store_true", help="draw each box's positive anchors too")
    i.add_argument("--limit", type=int, default=64, help="most images drawn (0: all)")
    i.add_argument("--only-missed", action="store_true", help="draw only images with a box without a positive anchor")
    i.add_argument(
        "--draw",
        choices=("auto", "labels", "boxes"),
        default="auto",
        help="boxes with their labels, boxes alone, or labels while they stay readable (auto)",
    )

    c = _command(
        sub,
        "fastpaths",
        "fastpaths",
        "the fast paths this machine measured (layouts, convolution "
        "algorithms, precision), with their figures; --reset forgets them",
    )
    c.add_argument("--reset", action="store_true", help="forget this machine's measured choices")

    _analysis_parsers(sub)
    return p


def _analysis_parsers(sub) -> None:
    a = sub.add_parser(
        "analyze", help="the paper's analysis: loss curves, worked examples, loss distribution", formatter_class=_Help
    )
    what = a.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    c = _command(
        what,
        "loss-curves",
        ("analyze", "loss_curves_main"),
        "Figures 1, 5 and 6: FL for several gamma, FL*, derivatives (PNG, CSV)",
    )
    c.add_argument("--output", default="runs/analysis", help="folder for the figures and their CSVs")
    c.add_argument("--points", type=int, default=1000, help="points per curve")
    e = _command(
        what,
        "examples",
        ("analyze", "examples_main"),
        "CE, balanced CE and FL of a foreground and a background example",
    )
    e.add_argument(
        "--p",
        type=float,
        nargs="+",
        default=[0.95, 0.05, 0.99, 0.01],
        help="predicted probabilities of the foreground class",
    )
    e.add_argument("--alpha", type=float, default=0.25, help="the weight of the foreground class")
    e.add_argument("--gamma", type=float, default=2.0, help="the focusing parameter")
    f = _command(
        what,
        "loss-cdf",
        ("analyze", "loss_cdf_main"),
        "Figure 4: cumulative loss of positive and negative anchors of a model",
    )
    f.add_argument("--checkpoint", required=True, help="a checkpoint written by `retinanet train`")
    _config_options(f, "run config YAML giving the data section (its validation set is used)")
    f.add_argument("--output", default="runs/analysis/loss_cdf", help="folder for loss_cdf.png, .csv, .json")
    f.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0], help="the curves' gammas")
    _device_option(f)
    f.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    f.add_argument("--max-images", type=int, help="use only the first N validation images (None: all)")

    b = _command(sub, "ablate", "ablate", "a grid of training runs, written as the paper's ablation tables")
    b.add_argument(
        "--grid",
        nargs="+",
        required=True,
        help="grid YAML files, or shipped grids by name: a, b, b_alpha, c, d, e, fl_star, prior, localisation",
    )
    b.add_argument("--config", help="base run config YAML (None: the shipped ablation base, small CPU runs)")
    b.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="override the base config")
    b.add_argument("--output", default="runs/ablate", help="folder of the grid's runs and tables")
    b.add_argument("--cells", nargs="+", metavar="NAME", help="run only these cells (the tables show all)")
    b.add_argument(
        "--minutes",
        type=float,
        help="train every cell for this many minutes (train.minutes, over what "
        "the grid sets): levers compared at equal time",
    )


# ------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])  # the command as typed, for the tables' footers
    from retinanet.runtime.machine import set_threads
    from retinanet.train import NonFiniteLossError, TrainingInterrupted

    set_threads()  # every command: OMP_NUM_THREADS, or the cores shared among torchrun's processes
    module, function = args.handler
    try:
        return getattr(importlib.import_module(f"retinanet.commands.{module}"), function)(args)
    except NonFiniteLossError as exc:
        print(f"retinanet: stopped: {exc}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as exc:  # DatasetError and DownloadError are ValueErrors
        print(f"retinanet: error: {_message(exc)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:  # 130 for Ctrl-C, 143 for SIGTERM: the shell's codes for those signals
        print(f"retinanet: {exc}; resume with: {_resume_command(argv, exc.checkpoint)}", file=sys.stderr)
        return 128 + exc.signal
    except KeyboardInterrupt:
        print("retinanet: interrupted; nothing was saved since the last checkpoint", file=sys.stderr)
        return 130


def _resume_command(argv: list[str] | None, checkpoint: Path) -> str:
    """This command line with --resume pointing at `checkpoint`."""
    args = list(argv if argv is not None else sys.argv[1:])
    if "--resume" in args:
        i = args.index("--resume")
        del args[i : i + 2]
    args = [a for a in args if not a.startswith("--resume=")]
    return shlex.join(["retinanet", *args, "--resume", str(checkpoint)])


def _message(exc: Exception) -> str:
    """The error's own message; one re-raised from a DataLoader worker carries the worker's traceback as text,
    whose last line is 'module.ErrorType: message'."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


if __name__ == "__main__":
    sys.exit(main())
