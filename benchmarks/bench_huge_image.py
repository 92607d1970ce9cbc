"""Tiled detection on an image past Pillow's limit: a 400-megapixel GeoTIFF (20,000 x 20,000 px, deflate, 512 px
blocks) read window by window (`retinanet detect --tile`, rasterio), against the way such an image is usually
handled: decoded whole (Pillow with its limit lifted, as SAHI and an untiled detector read it) and then tiled by
the same tiler and model. Peak memory (the process's maximum resident set) and megapixels per second, each in its
own process, one after the other.

    python benchmarks/bench_huge_image.py [--megapixels 400] [--tile 512] [--no-write]

The model is retinanet_tiny, untrained (the figures are of reading and tiling, not of accuracy); score threshold
0.5, so that the untrained model's boxes do not fill the output.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, untrained_tiny, write_section  # noqa: E402

PEER = r"""
import resource, sys, time, torch
from PIL import Image
from retinanet.inference import Predictor
from retinanet.inference.predictor import read_image
from retinanet.model import load_model
Image.MAX_IMAGE_PIXELS = None  # the limit lifted, as a user of a whole-image reader does
t0 = time.perf_counter()
image = read_image(sys.argv[1])
predictor = Predictor(load_model(sys.argv[2]), tile=int(sys.argv[3]), score_thresh=0.5, batch_size=4)
found = predictor.predict_tensors([image])[0]
print(time.perf_counter() - t0, len(found.boxes), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_raster(path: Path, side: int) -> None:
    """A side x side RGB GeoTIFF of smooth random texture with bright squares, written block by block."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    block = 2048
    profile = dict(
        driver="GTiff",
        width=side,
        height=side,
        count=3,
        dtype="uint8",
        crs="EPSG:32612",
        transform=from_origin(500000.0, 4000000.0, 0.1, 0.1),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        BIGTIFF="YES",
    )
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, side, block):
            for x in range(0, side, block):
                h, w = min(block, side - y), min(block, side - x)
                base = rng.integers(60, 120, size=(3, 1, 1), dtype=np.uint8)
                tile = np.broadcast_to(base, (3, h, w)).copy()
                for _ in range(20):
                    cy, cx, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(4, 20))
                    tile[:, max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = 230
                dst.write(tile, window=Window(x, y, w, h))


def ours(raster: Path, checkpoint: Path, tile: int, output: Path) -> dict:
    """`retinanet detect --tile` in its own process (rasterio's windows); its wall time and peak memory."""
    cmd = [
        sys.executable,
        "-c",
        "import resource, sys; from retinanet.cli import main; code = main(sys.argv[1:]); "
        "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
        "detect",
        str(raster),
        "--checkpoint",
        str(checkpoint),
        "--tile",
        str(tile),
        "--score-thresh",
        "0.5",
        "--output",
        str(output),
        "--overwrite",
        "--max-detections",
        "100",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    rss = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("maxrss")))
    found = sum(len(r["detections"]) for r in json.loads((output / "detections.json").read_text()))
    return {
        "seconds": seconds,
        "peak_gb": rss / 1e6,
        "detections": found,
        "geojson": (output / "detections.geojson").exists(),
    }


def peer(raster: Path, checkpoint: Path, tile: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PEER, str(raster), str(checkpoint), str(tile)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    seconds, found, rss = proc.stdout.split()[-3:]
    return {"seconds": float(seconds), "peak_gb": int(rss) / 1e6, "detections": int(found)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=400)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_huge_image"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    side = int(math.sqrt(args.megapixels * 1e6))
    raster = work / f"ortho_{side}.tif"
    if not raster.exists():
        make_raster(raster, side)
    checkpoint = untrained_tiny(work / "model", args.tile)
    megapixels = side * side / 1e6
    rows = {
        "ours: `detect --tile`, windows read by rasterio": ours(raster, checkpoint, args.tile, work / "out"),
        "decoded whole (Pillow, limit lifted), then the same tiler": peer(raster, checkpoint, args.tile),
    }
    lines = [
        f"A {side:,} x {side:,} px RGB GeoTIFF ({megapixels:.0f} megapixels, {raster.stat().st_size / 1e6:.0f} MB "
        f"deflate, 512 px blocks), tiles of {args.tile} px (overlap 0.2), batch 4, retinanet_tiny untrained "
        f"(score >= 0.5). Each in its own process, one after the other. {machine_line()}.",
        "",
        "| reading | seconds | megapixels / s | peak memory (GB) | detections |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['seconds']:.0f} | {megapixels / r['seconds']:.2f} | {r['peak_gb']:.2f} | "
            f"{r['detections']} |"
        )
    a, b = rows.values()
    lines += [
        "",
        f"Peak memory {b['peak_gb'] / a['peak_gb']:.1f}x lower by windows, at {b['seconds'] / a['seconds']:.2f}x "
        f"the speed; detections.geojson written: {a['geojson']}.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("huge_image", "## A 400-megapixel GeoTIFF in tiles: memory and speed\n\n" + text)


if __name__ == "__main__":
    main()
