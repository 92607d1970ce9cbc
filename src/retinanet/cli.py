"""The `retinanet` command: train, eval, detect, export, demo.

    retinanet train --config run.yaml --set train.max_iters=2000 model.gamma=1.0 [--resume runs/x/last.pt]
    retinanet eval --checkpoint runs/x/last.pt --config run.yaml --output runs/x/eval
    retinanet detect --checkpoint runs/x/last.pt images/ photo.jpg --output runs/x/detect
    retinanet detect --torchvision retinanet_resnet50_fpn photo.jpg --output out/
    retinanet detect --onnx model.onnx "scans/*.tif" list.txt --tile 800 --overlap 0.2 --csv [--engine openvino]
    retinanet export --checkpoint runs/x/last.pt --output model.onnx [--opset 18] [--image-size H W | --dynamic]
    retinanet demo [--output runs/demo]
    retinanet anchors --config run.yaml --output runs/anchors [--fit]   (which boxes the anchors miss; anchors that fit)
    retinanet inspect --config run.yaml --output runs/inspect [--split val] [--augment] [--show-anchors]
    retinanet analyze loss-curves --output docs/figures       (Figures 1, 5, 6 of the paper: PNG and CSV)
    retinanet analyze examples --p 0.95 0.05 0.99 0.01         (CE, balanced CE and FL at each p)
    retinanet analyze loss-cdf --checkpoint runs/x/last.pt --config run.yaml --output runs/x/loss_cdf  (Figure 4)
    retinanet ablate --grid a b d --config run.yaml --output runs/ablate   (Tables 1 and 3: a grid of runs)

Bad input (a missing or corrupt image, a bad box, an unknown category, a malformed file or config key, a download
that fails offline) ends the command with one line naming the file and the index, and exit status 2; a non-finite
loss with status 3. Ctrl-C during training saves a checkpoint and says how to resume (status 130).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retinanet", description="RetinaNet with focal loss: train, evaluate, detect.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (config YAML + overrides); torchrun for several processes")
    t.add_argument("--config", help="run config YAML (sections model, data, train)")
    t.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="override config values")
    t.add_argument("--resume", help="checkpoint to continue from exactly")
    t.add_argument("--skip-bad", action="store_true", help="warn about and drop bad images instead of stopping")

    e = sub.add_parser("eval", help="COCO AP of a checkpoint on the validation data of a config")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--config", help="run config YAML giving the data section")
    e.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    e.add_argument("--output", default="runs/eval")
    e.add_argument("--device", default="cpu")
    e.add_argument("--skip-bad", action="store_true")
    _size_options(e)

    d = sub.add_parser("detect", help="detect objects in images, folders, globs or list files; writes JSON (COCO "
                       "results too), annotated images, optionally CSV")
    d.add_argument("inputs", nargs="+", help="image files, folders, glob patterns or list files (.txt, one path a line)")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by `retinanet train`")
    src.add_argument("--torchvision", help="torchvision's COCO weights by name, retinanet_resnet50_fpn[_v2] "
                     "(downloaded once), or a downloaded checkpoint file of either")
    src.add_argument("--onnx", help="a model written by `retinanet export`, run by --engine")
    d.add_argument("--engine", default="onnxruntime", choices=["onnxruntime", "openvino"],
                   help="what runs --onnx (openvino: pip install 'retinanet[openvino]')")
    d.add_argument("--output", default="runs/detect")
    d.add_argument("--score-thresh", type=float, default=0.3)
    d.add_argument("--device", default="cpu")
    d.add_argument("--skip-bad", action="store_true", help="report unreadable images by name and go on")
    d.add_argument("--tile", type=int, help="detect in tiles of TILE x TILE px, merged across tile borders (large "
                   "images)")
    d.add_argument("--overlap", type=float, default=0.2, help="share of a tile that neighbouring tiles overlap")
    d.add_argument("--batch-size", type=int, default=4, help="images (or tiles) per forward pass")
    d.add_argument("--workers", type=int, default=2, help="processes decoding and resizing images (0: none)")
    d.add_argument("--csv", action="store_true", help="also write detections.csv in keras-retinanet's layout")
    d.add_argument("--no-draw", action="store_true", help="write no annotated images")
    _size_options(d)

    x = sub.add_parser("export", help="export a checkpoint to ONNX (detections decoded and NMS'd in the graph), "
                       "checked against PyTorch with ONNX Runtime")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--output", required=True, help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 or later")
    size = x.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="a fixed padded input size "
                      "(multiples of 32)")
    size.add_argument("--dynamic", action="store_true", help="any input size (the default)")
    x.add_argument("--check-images", nargs="*", default=None, help="images for the parity check (default: two "
                   "synthetic images)")
    _size_options(x)

    m = sub.add_parser("demo", help="train the small preset on synthetic shapes, evaluate, draw (a few minutes)")
    m.add_argument("--output", default="runs/demo")
    m.add_argument("--set", nargs="*", default=[], metavar="train.KEY=VALUE", help="override the demo's training")
    _analysis_parsers(sub)
    _data_parsers(sub)
    return p


def _data_parsers(sub) -> None:
    a = sub.add_parser("anchors", help="how many training boxes get an anchor at IoU >= fg_iou, by size and aspect "
                       "ratio (JSON, PNG); --fit: anchors that fit the data, as config overrides")  # fmt: skip
    a.add_argument("--config", help="run config YAML (model and data sections)")
    a.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    a.add_argument("--output", default="runs/anchors")
    a.add_argument("--fit", action="store_true", help="search anchor sizes, scales and ratios for the most coverage")
    a.add_argument("--max-anchors", type=int, default=9, help="most anchors per location the fit may use (A)")
    i = sub.add_parser("inspect", help="images after the transforms with each box coloured by its anchors, and the "
                       "data's statistics")  # fmt: skip
    i.add_argument("--config", help="run config YAML (model and data sections)")
    i.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    i.add_argument("--output", default="runs/inspect")
    i.add_argument("--split", choices=("train", "val"), default="train")
    i.add_argument("--augment", action="store_true", help="the training transforms: random sizes and flips")
    i.add_argument("--show-anchors", action="store_true", help="draw each box's positive anchors too")
    i.add_argument("--limit", type=int, default=64, help="most images drawn (0: all)")
    i.add_argument("--only-missed", action="store_true", help="draw only images with a box without a positive anchor")


def _analysis_parsers(sub) -> None:
    a = sub.add_parser("analyze", help="the paper's analysis: loss curves, worked examples, loss distribution")
    what = a.add_subparsers(dest="analysis", required=True)
    c = what.add_parser("loss-curves", help="Figures 1, 5 and 6: FL for several gamma, FL*, derivatives (PNG, CSV)")
    c.add_argument("--output", default="runs/analysis")
    c.add_argument("--points", type=int, default=1000, help="points per curve")
    e = what.add_parser("examples", help="CE, balanced CE and FL of a foreground and a background example")
    e.add_argument("--p", type=float, nargs="+", default=[0.95, 0.05, 0.99, 0.01],
                   help="predicted probabilities of the foreground class")  # fmt: skip
    e.add_argument("--alpha", type=float, default=0.25)
    e.add_argument("--gamma", type=float, default=2.0)
    f = what.add_parser("loss-cdf", help="Figure 4: cumulative loss of positive and negative anchors of a model")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--config", help="run config YAML giving the data section (its validation set is used)")
    f.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    f.add_argument("--output", default="runs/analysis/loss_cdf")
    f.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    f.add_argument("--device", default="cpu")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--max-images", type=int, help="use only the first N validation images")

    b = sub.add_parser("ablate", help="a grid of training runs, written as the paper's ablation tables")
    b.add_argument("--grid", nargs="+", required=True, help="grid YAML files, or shipped grids by name: "
                   "a, b, b_alpha, c, d, e, fl_star, prior")  # fmt: skip
    b.add_argument("--config", help="base run config YAML (default: the shipped ablation base, small CPU runs)")
    b.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="override the base config")
    b.add_argument("--output", default="runs/ablate")
    b.add_argument("--cells", nargs="+", metavar="NAME", help="run only these cells (the tables show all)")


def _size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-size", type=int, help="shorter side to resize to (default: the checkpoint's model.min_size)")
    p.add_argument("--max-size", type=int, help="cap on the longer side (default: the checkpoint's model.max_size)")


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    return {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v is not None}


def _run(args: argparse.Namespace) -> int:
    from retinanet import jobs
    from retinanet.runconfig import load_run_config, parse_overrides

    if args.command == "train":
        extra = ["data.skip_bad=true"] if args.skip_bad else []
        cfg = load_run_config(args.config, args.set + extra)
        result = jobs.run_train(cfg, resume=args.resume)
        print(f"trained to iteration {result['iteration']}; checkpoint {result['checkpoint']}")
        if result.get("metrics"):
            print(json.dumps(result["metrics"], indent=2, default=float))
        return 0
    if args.command == "eval":
        extra = ["data.skip_bad=true"] if args.skip_bad else []
        cfg = load_run_config(args.config, args.set + extra)
        # the checkpoint's model, with the model keys given on the command line (--set model.min_size=..., as
        # --min-size) applied to it; the precision the run's config trained and evaluated in
        model_keys = {**parse_overrides(args.set).get("model", {}), **_sizes(args)}
        metrics = jobs.run_eval(args.checkpoint, cfg.data, args.output, args.device, cfg.train.amp, **model_keys)
        print(json.dumps(metrics.to_dict(), indent=2, default=float))
        return 0
    if args.command == "detect":
        results = jobs.run_detect(args.inputs, args.output, args.checkpoint, args.torchvision, args.score_thresh,
                                  args.device, skip_bad=args.skip_bad, onnx=args.onnx, engine=args.engine,
                                  tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                                  workers=args.workers, csv_file=args.csv, draw=not args.no_draw,
                                  **_sizes(args))  # fmt: skip
        n = sum(len(r["detections"]) for r in results)
        print(f"{n} detections in {len(results)} images; detections.json, results.json (COCO) in {args.output}")
        return 0
    if args.command == "export":
        report = jobs.run_export(args.checkpoint, args.output, args.opset, args.image_size, args.check_images,
                                 **_sizes(args))  # fmt: skip
        print(report.describe())
        if not report.ok:
            raise ValueError(f"{args.output}: the exported model's detections differ from PyTorch's (above)")
        print(f"exported to {args.output}; ONNX checker passed, detections as PyTorch's")
        return 0
    if args.command in ("analyze", "ablate"):
        return _run_analysis(args)
    if args.command in ("anchors", "inspect"):
        return _run_data_tool(args, jobs, load_run_config(args.config, args.set))
    overrides = parse_overrides(args.set)
    unknown = sorted(set(overrides) - {"train"})
    if unknown:
        raise ValueError(f"demo overrides take train.KEY=VALUE only, got section(s) {unknown}")
    summary = jobs.run_demo(args.output, **overrides.get("train", {}))
    print("COCO metrics on the synthetic validation split:")
    for k, v in summary.items():
        print(f"  {k:>13}: {v:.4f}" if isinstance(v, float) else f"  {k:>13}: {v}")
    print(f"written to {Path(args.output) / 'metrics.json'}")
    return 0


def _run_data_tool(args: argparse.Namespace, jobs, cfg) -> int:
    import yaml

    if args.command == "anchors":
        summary = jobs.run_anchors(cfg, args.output, fit=args.fit, max_anchors=args.max_anchors)
        _print_coverage("anchors", summary)
        if args.fit:
            _print_coverage("fitted", summary["fitted"])
            print(f"the fitted anchors, to paste into the config (also {Path(args.output) / 'anchors_fit.yaml'}):")
            print(yaml.safe_dump({"model": summary["overrides"]}, sort_keys=False, default_flow_style=None).rstrip())
        print(f"anchors.json and anchors.png in {args.output} ({summary['seconds']} s)")
        return 0
    result = jobs.run_inspect(cfg, args.output, args.split, args.augment, args.show_anchors, args.limit or None,
                              args.only_missed)  # fmt: skip
    stats, by_status = result["statistics"], result["boxes_by_status"]
    print(f"{stats['images']} images ({stats['empty_images']} empty), {stats['boxes']} boxes; drawn: "
          f"{len(result['images'])} images, boxes with a positive anchor {by_status.get('positive', 0)}, only "
          f"low-quality {by_status.get('low_quality_only', 0)}, none {by_status.get('no_anchor', 0)}")  # fmt: skip
    print(f"images/, stats.json, stats.png and inspect.json in {args.output}")
    return 0


def _print_coverage(name: str, summary: dict) -> None:
    """The coverage overall and by size bucket, as a few lines."""
    if not summary["boxes"]:
        print(f"{name}: no boxes")
        return
    print(f"{name}: {100 * summary['coverage']:.1f}% of {summary['boxes']} boxes have an anchor at IoU >= "
          f"{summary['fg_iou']:g}; {100 * summary['low_quality_only']:.1f}% only low-quality matches, "
          f"{100 * summary['no_anchor']:.1f}% none")  # fmt: skip
    for row in summary["by_size"] + summary["by_aspect_ratio"]:
        print(f"  {row['bucket']:>12}: {row['boxes']:>7} boxes, {100 * row['coverage']:5.1f}% covered, "
              f"{100 * row['no_anchor']:5.1f}% none")  # fmt: skip


def _run_analysis(args: argparse.Namespace) -> int:
    from retinanet.analysis import ablate, curves, grids, loss_cdf
    from retinanet.engine import TrainingInterrupted
    from retinanet.runconfig import load_run_config

    if args.command == "ablate":
        config = args.config or grids.shipped_file("base.yaml")
        base = load_run_config(config, args.set)
        source = args.config or "retinanet/analysis/grids/base.yaml (shipped)"
        try:
            outcome = ablate.run_grids([grids.load_grid(g) for g in args.grid], base, args.output, source,
                                       ["retinanet", *args.argv], args.cells)  # fmt: skip
        except TrainingInterrupted as exc:  # the cell resumes from its checkpoint when the grid runs again
            print(f"retinanet: {exc}; continue with the same command", file=sys.stderr)
            return 130
        print(f"ablate: ran {len(outcome['ran'])} cells, {len(outcome['done'])} were done, "
              f"{len(outcome['held'])} run by other processes; tables in {args.output}")  # fmt: skip
        return 0
    if args.analysis == "loss-curves":
        for path in curves.write_loss_curves(args.output, args.points):
            print(path)
        return 0
    if args.analysis == "examples":
        print(curves.examples_table(curves.loss_examples(args.p, args.alpha, args.gamma), args.alpha, args.gamma))
        return 0
    cfg = load_run_config(args.config, args.set)
    result = loss_cdf.run_loss_cdf(args.checkpoint, cfg.data, args.output, args.gammas, args.device,
                                   args.batch_size, args.max_images)  # fmt: skip
    print(loss_cdf.describe(result))
    print(f"written to {args.output}: loss_cdf.png, loss_cdf.csv, loss_cdf.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])  # the command as typed, for the tables' footers
    from retinanet.engine import NonFiniteLossError, TrainingInterrupted

    try:
        return _run(args)
    except NonFiniteLossError as exc:
        print(f"retinanet: stopped: {exc}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as exc:  # DatasetError and DownloadError are ValueErrors
        print(f"retinanet: error: {_message(exc)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"retinanet: {exc}; resume with: {_resume_command(argv, exc.checkpoint)}", file=sys.stderr)
        return 130
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
