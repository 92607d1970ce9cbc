"""`retinanet detect` over folders of 500 to 5,000 images: the peak memory (the process's maximum resident set)
against the number of images, each count in its own process. Flat means the memory does not grow with the folder.

    python benchmarks/bench_detect_memory.py [--counts 500 1000 2000 5000] [--size 320] [--no-write]
    python benchmarks/bench_detect_memory.py --source ../old/src --no-write   # another checkout's code, to compare

The model is retinanet_tiny, untrained, at the images' size, its classification bias set to 0 so that every image
reaches the cap of 100 detections (a dense scene: 500,000 detections over 5,000 images); score threshold 0.05 (the
paper's); 2 decoding workers; no drawings (drawings are written one by one and do not accumulate).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, untrained_tiny, write_section  # noqa: E402


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i:05d}.jpg"
        if not path.exists():
            pixels = rng.integers(40, 200, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def dense(checkpoint: Path) -> Path:
    """A copy of `checkpoint` whose classification bias is 0: scores near 0.5 everywhere, every image at the cap."""
    import torch

    path = checkpoint.with_name("dense.pt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved["model"]["head.cls_logits.bias"].zero_()
    torch.save(saved, path)
    return path


def detect(listing: Path, checkpoint: Path, output: Path, source: Path | None = None) -> tuple[float, float, int]:
    """(seconds, peak resident memory in MB, detections) of one `retinanet detect` process."""
    cmd = [
        sys.executable,
        "-c",
        "import resource, sys; from retinanet.cli import main; code = main(sys.argv[1:]); "
        "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
        "detect",
        str(listing),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(output),
        "--overwrite",
        "--no-draw",
        "--score-thresh",
        "0.05",
        "--workers",
        "2",
        "--batch-size",
        "8",
    ]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(source.resolve())} if source is not None else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    rss = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("maxrss")))
    found = int(next(line.split()[0] for line in proc.stdout.splitlines() if " detections in " in line))
    return time.perf_counter() - t0, rss / 1e3, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 1000, 2000, 5000])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_detect_memory"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--source", type=Path, help="the src/ folder of another checkout whose detect is measured")
    args = parser.parse_args()
    work = args.work
    images = make_images(work / "images", max(args.counts), args.size)
    checkpoint = dense(untrained_tiny(work / "model", args.size))
    rows = []
    for count in args.counts:
        listing = work / f"first_{count}.txt"
        listing.write_text("\n".join(str(p.resolve()) for p in images[:count]) + "\n")
        seconds, peak, found = detect(listing, checkpoint, work / f"out_{count}", args.source)
        rows.append((count, found, seconds, peak))
        print(f"{count} images: {found} detections, {seconds:.0f} s, peak {peak:.0f} MB", flush=True)
    lines = [
        f"`retinanet detect` of {args.size} px JPEGs with retinanet_tiny (untrained, classification bias 0: every "
        "image at the cap of 100 detections), score >= 0.05, 2 decoding workers, batch 8, no drawings; each count "
        f"in its own process (the workers' memory is their own); the outputs streamed to disk. {machine_line()}.",
        "",
        "| images | detections | seconds | peak memory of the main process (MB) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {count:,} | {found:,} | {seconds:.0f} | {peak:.0f} |" for count, found, seconds, peak in rows]
    (first, _, _, low), (last, _, _, high) = rows[0], rows[-1]
    lines += [
        "",
        f"From {first:,} to {last:,} images the peak grew by {high - low:.0f} MB "
        f"({1000 * (high - low) / max(last - first, 1):.1f} kB per image).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(
            "detect_memory", "## Detection over a large folder: memory against the number of images\n\n" + text
        )


if __name__ == "__main__":
    main()
