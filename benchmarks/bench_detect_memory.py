"""`retinanet detect` over folders of 500 to 5,000 images: the peak memory (the process's maximum resident set)
against the number of images, each count in its own process. Flat means the memory does not grow with the folder.

    python benchmarks/bench_detect_memory.py [--counts 500 1000 2000 5000] [--size 320] [--no-write]

The model is retinanet_tiny, untrained, at the images' size; score threshold 0.5; 2 decoding workers; no drawings
(drawings are written one by one and do not accumulate).
"""

from __future__ import annotations

import argparse
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


def detect(listing: Path, checkpoint: Path, output: Path) -> tuple[float, float]:
    """(seconds, peak resident memory in MB) of one `retinanet detect` process."""
    cmd = [sys.executable, "-c", "import resource, sys; from retinanet.cli import main; code = main(sys.argv[1:]); "
           "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
           "detect", str(listing), "--checkpoint", str(checkpoint), "--output", str(output), "--overwrite",
           "--no-draw", "--score-thresh", "0.5", "--workers", "2", "--batch-size", "8"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    rss = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("maxrss")))
    return time.perf_counter() - t0, rss / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 1000, 2000, 5000])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_detect_memory"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = args.work
    images = make_images(work / "images", max(args.counts), args.size)
    checkpoint = untrained_tiny(work / "model", args.size)
    rows = []
    for count in args.counts:
        listing = work / f"first_{count}.txt"
        listing.write_text("\n".join(str(p.resolve()) for p in images[:count]) + "\n")
        seconds, peak = detect(listing, checkpoint, work / f"out_{count}")
        rows.append((count, seconds, peak))
        print(f"{count} images: {seconds:.0f} s, peak {peak:.0f} MB", flush=True)
    lines = [f"`retinanet detect` of {args.size} px JPEGs with retinanet_tiny (untrained, score >= 0.5), 2 decoding "
             f"workers, batch 8, no drawings; each count in its own process (the workers' memory is their own). "
             f"{machine_line()}.", "", "| images | seconds | peak memory of the main process (MB) |", "|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {count:,} | {seconds:.0f} | {peak:.0f} |" for count, seconds, peak in rows]
    (first, _, low), (last, _, high) = rows[0], rows[-1]
    lines += ["", f"From {first:,} to {last:,} images the peak grew by {high - low:.0f} MB "
              f"({1000 * (high - low) / max(last - first, 1):.1f} kB per image)."]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("detect_memory", "## Detection over a large folder: memory against the number of images\n\n"
                      + text)  # fmt: skip


if __name__ == "__main__":
    main()
