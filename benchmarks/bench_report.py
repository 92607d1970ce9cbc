"""The evaluation report at scale: 5,000 images with 100,000 detections, written and opened in headless Chromium.

Measured: the error analysis and the page's writing (seconds), the page's size and its thumbnails' (the gallery
keeps the 1,000 images with the most errors), and in the browser the time from navigation to the first gallery
page drawn, and the time a move of the threshold control takes to recount and redraw.

    python benchmarks/bench_report.py [--images 5000] [--per-image 20] [--output runs/bench_report] [--no-write]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHROMIUM_ARGS, chromium, write_section  # noqa: E402

from retinanet.evaluation.errors import analyze_errors  # noqa: E402
from retinanet.evaluation.report import ReportImage, write_report  # noqa: E402


def synthetic_evaluation(images: int, per_image: int, classes: int = 5, size=(480, 640), seed: int = 0):
    """Ground truth and detections like a real evaluation's: most boxes found and moved a little, some missed,
    wrong classes, duplicates and background detections."""
    g = torch.Generator().manual_seed(seed)
    gts, dets, shown = [], [], []
    blank = np.full((*size, 3), 210, np.uint8)
    for i in range(images):
        n = per_image // 2
        xy = torch.rand(n, 2, generator=g) * torch.tensor([size[1] - 60, size[0] - 60])
        boxes = torch.cat([xy, xy + 16 + torch.rand(n, 2, generator=g) * 40], 1)
        labels = torch.randint(0, classes, (n,), generator=g)
        moved = boxes + torch.randn(n, 4, generator=g) * 3
        other = torch.rand(per_image - n, 2, generator=g) * torch.tensor([size[1] - 40, size[0] - 40])
        found = torch.cat([moved, torch.cat([other, other + 30], 1)])
        found_labels = torch.cat(
            [
                torch.where(torch.rand(n, generator=g) < 0.1, (labels + 1) % classes, labels),
                torch.randint(0, classes, (per_image - n,), generator=g),
            ]
        )
        gts.append({"boxes": boxes, "labels": labels})
        dets.append({"boxes": found, "scores": torch.rand(per_image, generator=g), "labels": found_labels})
        shown.append(ReportImage(f"image_{i:05d}", size, None, blank))
    return gts, dets, shown


def browser_times(page: Path) -> tuple[float, float] | None:
    """(seconds to the first gallery page drawn, seconds for one move of the threshold control) in headless
    Chromium, or None without Chromium or playwright."""
    executable = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if executable is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        tab = browser.new_page()
        t0 = time.perf_counter()
        tab.goto(page.as_uri())
        tab.wait_for_selector("#gallery .card svg")
        load = time.perf_counter() - t0
        move = (
            tab.evaluate("""() => { const e = document.getElementById('threshold'); const t0 = performance.now();
            e.value = 0.7; e.dispatchEvent(new Event('input')); return performance.now() - t0; }""")
            / 1000
        )
        browser.close()
    return load, move


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path("runs/bench_report"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    gts, dets, shown = synthetic_evaluation(args.images, args.per_image)
    t0 = time.perf_counter()
    errors = analyze_errors(gts, dets)
    t_errors = time.perf_counter() - t0
    shutil.rmtree(args.output, ignore_errors=True)
    t0 = time.perf_counter()
    page = write_report(args.output, shown, gts, dets, [f"class {k}" for k in range(5)], errors)
    t_write = time.perf_counter() - t0
    thumbs = sum(f.stat().st_size for f in (args.output / "images").iterdir())
    times = browser_times(page)
    lines = [
        f"{args.images} images, {args.images * args.per_image} detections (synthetic: found, moved, missed, "
        "wrong classes, duplicates, background), 5 classes.",
        "",
        "| step | figure |",
        "|---|---:|",
        f"| error analysis (TIDE decomposition at 10 IoU thresholds) | {t_errors:.1f} s |",
        f"| writing the page and 1,000 thumbnails | {t_write:.1f} s |",
        f"| index.html | {page.stat().st_size / 1e6:.1f} MB |",
        f"| images/ (1,000 thumbnails) | {thumbs / 1e6:.1f} MB |",
    ]
    if times:
        lines += [
            f"| headless Chromium: navigation to the first gallery page drawn | {times[0]:.2f} s |",
            f"| headless Chromium: one move of the threshold control (recount, redraw) | {1000 * times[1]:.0f} ms |",
        ]
    else:
        lines += ["", "No browser figures: Chromium or playwright is not installed."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("report", "## The evaluation report at scale\n\n" + text)


if __name__ == "__main__":
    main()
