"""Focal loss forward+backward: time and peak extra memory, ours against torchvision.ops.sigmoid_focal_loss; and its
IoU-aware successors (QFL, VFL), ours (fused, from labels and one quality per anchor) against their formulas written
as plain PyTorch autograd ops, the way a library without a fused kernel computes them (torchvision has neither).

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
    x = x0.clone().requires_grad_()
    x_rows = x0.reshape(-1, shape[-1]).clone().requires_grad_()
    candidates = {
        "torchvision.ops.sigmoid_focal_loss": (lambda a: tv_sigmoid_focal_loss(a, targets, reduction="sum"), x, "auto"),
        "retinanet sigmoid_focal_loss (eager)": (
            lambda a: losses.sigmoid_focal_loss(a, targets, reduction="sum"),
            x,
            "eager",
        ),
        "retinanet sigmoid_focal_loss (compiled)": (
            lambda a: losses.sigmoid_focal_loss(a, targets, reduction="sum"),
            x,
            "compile",
        ),
        "retinanet sigmoid_focal_loss_from_labels (compiled)": (
            lambda a: losses.sigmoid_focal_loss_from_labels(a, labels),
            x_rows,
            "compile",
        ),
    }
    return measure(shape, candidates, device, repeats)


def measure(shape, candidates: dict, device: str, repeats: int) -> list[dict]:
    """Time (median) and peak extra memory of forward + backward of each candidate: name -> (loss of the input, the
    input that needs a gradient, the loss backend to run it with)."""
    sync = torch.cuda.synchronize if device == "cuda" else None
    peak = peak_extra_cuda_bytes if device == "cuda" else peak_extra_cpu_bytes
    rows = []
    for name, (fn, inp, backend) in candidates.items():

        def go(fn=fn, inp=inp):
            inp.grad = None
            fn(inp).backward()

        losses.set_loss_backend(backend)
        try:
            t = median_time(go, repeats, warmup=2, sync=sync)
            inp.grad = None
            m = peak(go)
        finally:
            losses.set_loss_backend("auto")
        rows.append({"shape": shape, "name": name, "seconds": t, "peak_bytes": m})
        print(f"{str(shape):>16} {name:<52} {t * 1e3:9.1f} ms {m / 2**20:9.1f} MiB", flush=True)
    return rows


def _plain_qfl(x, t, beta=2.0):
    p = torch.sigmoid(x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    return ((t - p).abs().pow(beta) * bce).sum()


def _plain_vfl(x, t, alpha=0.75, gamma=2.0):
    p = torch.sigmoid(x)
    weight = torch.where(t > 0, t, alpha * p.pow(gamma))
    return (torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none") * weight).sum()


def run_successors(shape, device: str, repeats: int) -> list[dict]:
    """QFL and VFL: the formula as plain autograd ops on dense soft targets against ours from labels and quality."""
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(shape, generator=g) * 2 - 4).to(device)
    rows_x = x0.reshape(-1, shape[-1])
    positive = torch.rand(rows_x.shape[0], generator=g) < 0.01  # 1% of the anchors positive
    labels = torch.where(positive, torch.randint(0, shape[-1], (rows_x.shape[0],), generator=g), -1).to(device)
    quality = torch.rand(rows_x.shape[0], generator=g).to(device)
    dense = (labels[:, None] == torch.arange(shape[-1], device=device)).float() * quality[:, None]
    x = rows_x.clone().requires_grad_()
    candidates = {
        "QFL, plain PyTorch autograd (dense targets)": (lambda a: _plain_qfl(a, dense), x, "auto"),
        "QFL, retinanet from labels (compiled)": (
            lambda a: losses.sigmoid_focal_loss_from_labels(a, labels, loss="quality_focal", beta=2.0, quality=quality),
            x,
            "compile",
        ),
        "VFL, plain PyTorch autograd (dense targets)": (lambda a: _plain_vfl(a, dense), x, "auto"),
        "VFL, retinanet from labels (compiled)": (
            lambda a: losses.sigmoid_focal_loss_from_labels(a, labels, 0.75, 2.0, loss="varifocal", quality=quality),
            x,
            "compile",
        ),
    }
    return measure(shape, candidates, device, repeats)


def successors_table(rows: list[dict], device: str) -> str:
    lines = [
        f"Device: {device}. Forward + backward of the summed loss; ours takes one class index and one IoU per anchor "
        "(the plain version needs the dense soft targets, built outside the timing). Median time; peak extra "
        "memory above the inputs.",
        "",
        "| shape | implementation | time (ms) | speed-up vs plain | peak extra memory (MiB) | memory vs plain |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape in SHAPES[:2]:
        group = [r for r in rows if r["shape"] == shape]
        for plain, ours in zip(group[::2], group[1::2]):
            for r in (plain, ours):
                lines.append(
                    f"| {list(shape)} | {r['name']} | {r['seconds'] * 1e3:.1f} | "
                    f"{plain['seconds'] / r['seconds']:.2f}x | {r['peak_bytes'] / 2**20:.1f} | "
                    f"{plain['peak_bytes'] / max(r['peak_bytes'], 1):.1f}x less |"
                )
    return "\n".join(lines)


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"Device: {device}. Forward + backward, reduction 'sum', 1% positives; median time; peak extra memory is the",
        "allocator's high-water mark above the inputs during the step (the gradient of the logits included).",
        "",
        "| shape | implementation | time (ms) | speed-up vs torchvision | peak extra memory (MiB) "
        "| memory vs torchvision |",
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
    successors = []
    for shape in SHAPES[:2]:
        successors += run_successors(shape, args.device, args.repeats)
    text += "\n\n### QFL and VFL, fused, against their formulas in plain PyTorch\n\n" + successors_table(
        successors, args.device
    )
    print(text)
    if not args.no_write:
        write_section(f"losses-{args.device}", "## Focal loss: forward + backward against torchvision\n\n" + text)


if __name__ == "__main__":
    main()
