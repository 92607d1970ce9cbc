"""The `retinanet` command: train, eval, detect, demo.

    retinanet train --config run.yaml --set train.max_iters=2000 model.gamma=1.0 [--resume runs/x/last.pt]
    retinanet eval --checkpoint runs/x/last.pt --config run.yaml --output runs/x/eval
    retinanet detect --checkpoint runs/x/last.pt images/ photo.jpg --output runs/x/detect
    retinanet detect --torchvision retinanet_resnet50_fpn photo.jpg --output out/
    retinanet demo [--output runs/demo]

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

    d = sub.add_parser("detect", help="detect objects in images or folders; writes annotated images and JSON")
    d.add_argument("inputs", nargs="+", help="image files or folders")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by `retinanet train`")
    src.add_argument("--torchvision", help="torchvision's COCO weights by name, retinanet_resnet50_fpn[_v2] "
                     "(downloaded once), or a downloaded checkpoint file of either")
    d.add_argument("--output", default="runs/detect")
    d.add_argument("--score-thresh", type=float, default=0.3)
    d.add_argument("--device", default="cpu")
    d.add_argument("--skip-bad", action="store_true", help="report unreadable images by name and go on")
    _size_options(d)

    m = sub.add_parser("demo", help="train the small preset on synthetic shapes, evaluate, draw (a few minutes)")
    m.add_argument("--output", default="runs/demo")
    m.add_argument("--set", nargs="*", default=[], metavar="train.KEY=VALUE", help="override the demo's training")
    return p


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
        metrics = jobs.run_eval(args.checkpoint, cfg.data, args.output, args.device, **_sizes(args))
        print(json.dumps(metrics.to_dict(), indent=2, default=float))
        return 0
    if args.command == "detect":
        results = jobs.run_detect(args.inputs, args.output, args.checkpoint, args.torchvision, args.score_thresh,
                                  args.device, skip_bad=args.skip_bad, **_sizes(args))  # fmt: skip
        n = sum(len(r["detections"]) for r in results)
        print(f"{n} detections in {len(results)} images; annotated images and detections.json in {args.output}")
        return 0
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
