"""Focal loss forward+backward: time and peak extra memory, ours against torchvision.ops.sigmoid_focal_loss.

Shapes are RetinaNet's anchor counts x 80 classes: [2, 49104, 80] (2 images of 512x512), [8, 49104, 80] and
[2, 201600, 80] (2 images of 800x1344); dense float targets with about 1% positives; reduction "sum" as in the
detector. Each row is measured in this one run on this machine; times are medians over --repeats runs.

    python benchmarks/bench_losses.py [--repeats 7] [--device cpu|cuda] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, peak_extra_cpu_bytes, peak_extra_cuda_bytes, write_section  # noqa: E402

from retinanet import losses  # noqa: E402

SHAPES = [(2, 49104, 80), (8, 49104, 80), (2, 201600, 80)]


def run(shape, device: str, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(shape, generator=g) * 2 - 4).to(device)
    targets = (torch.rand(shape, generator=g) < 0.01).float().to(device)
    labels = torch.where(targets.reshape(-1, shape[-1]).any(1), targets.reshape(-1, shape[-1]).argmax(1), -1)
    sync = torch.cuda.synchronize if device == "cuda" else None
    peak = peak_extra_cuda_bytes if device == "cuda" else peak_extra_cpu_bytes

    def step(fn, x):
        def go():
            x.grad = None
            fn(x).backward()
        return go

    x = x0.clone().requires_grad_()
    x_rows = x0.reshape(-1, shape[-1]).clone().requires_grad_()
    candidates = {
        "torchvision.ops.sigmoid_focal_loss": (lambda a: tv_sigmoid_focal_loss(a, targets, reduction="sum"), x, "auto"),
        "retinanet sigmoid_focal_loss (eager)": (lambda a: losses.sigmoid_focal_loss(a, targets, reduction="sum"), x, "eager"),
        "retinanet sigmoid_focal_loss (compiled)": (lambda a: losses.sigmoid_focal_loss(a, targets, reduction="sum"), x, "compile"),
        "retinanet sigmoid_focal_loss_from_labels (compiled)": (lambda a: losses.sigmoid_focal_loss_from_labels(a, labels), x_rows, "compile"),
    }
    rows = []
    for name, (fn, inp, backend) in candidates.items():
        losses.set_loss_backend(backend)
        try:
            go = step(fn, inp)
            t = median_time(go, repeats, warmup=2, sync=sync)
            inp.grad = None
            m = peak(go)
        finally:
            losses.set_loss_backend("auto")
        rows.append({"shape": shape, "name": name, "seconds": t, "peak_bytes": m})
        print(f"{str(shape):>16} {name:<52} {t * 1e3:9.1f} ms {m / 2**20:9.1f} MiB", flush=True)
    return rows


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"Device: {device}. Forward + backward, reduction 'sum', 1% positives; median time; peak extra memory is the",
        "allocator's high-water mark above the inputs during the step (the gradient of the logits included).",
        "",
        "| shape | implementation | time (ms) | speed-up vs torchvision | peak extra memory (MiB) | memory vs torchvision |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape in SHAPES:
        group = [r for r in rows if r["shape"] == shape]
        if not group:
            continue
        ref = group[0]
        for r in group:
            lines.append(
                f"| {list(shape)} | {r['name']} | {r['seconds'] * 1e3:.1f} | {ref['seconds'] / r['seconds']:.2f}x "
                f"| {r['peak_bytes'] / 2**20:.1f} | {ref['peak_bytes'] / max(r['peak_bytes'], 1):.1f}x less |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        rows += run(shape, args.device, args.repeats)
    text = table(rows, args.device)
    print(text)
    if not args.no_write:
        write_section(f"losses-{args.device}", "## Focal loss: forward + backward against torchvision\n\n" + text)


if __name__ == "__main__":
    main()
