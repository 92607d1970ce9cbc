"""The real development set: NEON tree crowns annotated by the DeepForest project, shipped in its wheel.

    python benchmarks/real_trees.py [--data runs/real_trees]     # builds the set once, prints what it holds

Source: `pip download deepforest==2.1.0 --no-deps` (cached in ~/.cache/retinanet/deepforest). Of the wheel's
annotated images this script extracts two, and nothing else:
- 2019_YELL_2_528000_4978000_image_crop2 (2299 x 2472 px, 574 crowns of about 41 px, Yellowstone): the training
  part is every row above the held-out strip, cut into 400 px tiles at a stride of 200 px; the held-out strip (the
  bottom STRIP rows) is cut into 400 px tiles that do not overlap the training part: `val` (same orthophoto, unseen
  ground).
- SOAP_061 (400 x 400 px, 37 crowns, Soaproot Saddle, another site and sensor flight): `val_soap`. Its labels Alive
  and Dead are both trees here.
The wheel's other annotated images are the project owners' held-out test: never extracted, trained, tuned or
evaluated on here.

A crown cut by a tile's border is kept, clipped, when at least MIN_VISIBLE of its area is inside the tile, and
dropped otherwise (the same rule for every split and for every detector compared). Writes, under --data, COCO files
train.json, val.json, val_soap.json with their PNG tiles in images/, and run configs for our recipe.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

WHEEL = "deepforest==2.1.0"
CACHE = Path.home() / ".cache" / "retinanet" / "deepforest"
TRAIN_IMAGE = "2019_YELL_2_528000_4978000_image_crop2"
OTHER_SITE = "SOAP_061"
DEVELOPMENT = (TRAIN_IMAGE, OTHER_SITE)  # the only images this script reads from the wheel
TILE = 400
STRIDE = 200
STRIP = 800  # held-out rows at the bottom of the training image: two rows of tiles
MIN_VISIBLE = 0.5


@dataclass
class Annotated:
    """An image (uint8 H x W x 3) and its boxes [N, 4] float XYXY pixels."""

    name: str
    pixels: np.ndarray
    boxes: np.ndarray


def wheel(cache: Path = CACHE) -> Path:
    """The deepforest wheel, downloaded once (pip download, from the package index)."""
    found = sorted(cache.glob("deepforest-2.1.0-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(cache), "-q"], check=True)
    return sorted(cache.glob("deepforest-2.1.0-*.whl"))[0]


def read(name: str, archive: Path) -> Annotated:
    """One development image and its Pascal VOC boxes, read from the wheel (only the names in DEVELOPMENT)."""
    if name not in DEVELOPMENT:
        raise ValueError(f"{name} is not a development image: the wheel's other images are the held-out test")
    with zipfile.ZipFile(archive) as z:
        with z.open(f"deepforest/data/{name}.png") as f:
            pixels = np.asarray(Image.open(f).convert("RGB"))
        xml = z.read(f"deepforest/data/{name}.xml").decode()
    found = re.findall(r"<xmin>(\d+)</xmin>\s*<ymin>(\d+)</ymin>\s*<xmax>(\d+)</xmax>\s*<ymax>(\d+)</ymax>", xml)
    return Annotated(name, pixels, np.array(found, dtype=np.float64).reshape(-1, 4))


def starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, length): every `stride`, the last one flush with the end."""
    out = list(range(0, max(length - tile, 0) + 1, stride))
    if out[-1] + tile < length:
        out.append(length - tile)
    return out


def cut(image: Annotated, x0: int, y0: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The tile at (x0, y0) and its boxes in tile pixels: clipped, those with less than MIN_VISIBLE inside dropped."""
    b = image.boxes
    clipped = np.stack(
        [
            b[:, 0].clip(x0, x0 + size),
            b[:, 1].clip(y0, y0 + size),
            b[:, 2].clip(x0, x0 + size),
            b[:, 3].clip(y0, y0 + size),
        ],
        1,
    )
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = inside >= MIN_VISIBLE * area
    return image.pixels[y0 : y0 + size, x0 : x0 + size], clipped[keep] - [x0, y0, x0, y0]


def tiles(image: Annotated, region: tuple[int, int, int, int], stride: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, pixels, boxes) of the TILE px tiles inside region (x0, y0, x1, y1) of the image, at `stride`."""
    x0, y0, x1, y1 = region
    out = []
    for ty in starts(y1 - y0, TILE, stride):
        for tx in starts(x1 - x0, TILE, stride):
            pixels, boxes = cut(image, x0 + tx, y0 + ty, TILE)
            out.append((f"{image.name}_{x0 + tx}_{y0 + ty}.png", pixels, boxes))
    return out


def write_split(folder: Path, split: str, items: list[tuple[str, np.ndarray, np.ndarray]]) -> dict:
    """COCO file folder/split.json with its images in folder/images; a summary of the split."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (name, pixels, boxes) in enumerate(items, start=1):
        Image.fromarray(pixels).save(folder / "images" / name)
        images.append({"id": i, "file_name": name, "width": int(pixels.shape[1]), "height": int(pixels.shape[0])})
        for x1, y1, x2, y2 in boxes.tolist():
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                }
            )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "tree"}]}
    (folder / f"{split}.json").write_text(json.dumps(coco))
    sides = [np.sqrt(a["area"]) for a in annotations]
    return {
        "split": split,
        "images": len(images),
        "boxes": len(annotations),
        "median_side_px": round(float(np.median(sides)), 1) if sides else None,
    }


def build(data: Path) -> list[dict]:
    """Write the development set under `data` (once: an existing set is kept) and return its splits' summaries."""
    summary_file = data / "summary.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    archive = wheel()
    yell, soap = read(TRAIN_IMAGE, archive), read(OTHER_SITE, archive)
    height, width = yell.pixels.shape[:2]
    top = height - STRIP
    train = tiles(yell, (0, 0, width, top), STRIDE)  # every tile ends above the strip
    val = tiles(yell, (0, top, width, height), TILE)  # inside the strip, side by side
    summary = [
        write_split(data, "train", train),
        write_split(data, "val", val),
        write_split(data, "val_soap", [(f"{soap.name}.png", soap.pixels, soap.boxes)]),
    ]
    summary_file.write_text(json.dumps(summary, indent=1))
    return summary


OTHER_SITE_SET = "other_site"  # the name of SOAP_061's validation set in our runs (data.extra_val)


def data_config(data: Path, val: str = "val", other_site: bool = True) -> dict:
    """The `data` section of a run config on the development set, validating on `val` (val or val_soap) and, with
    other_site, on SOAP_061 as a second validation set (data.extra_val: reported on its own, weighed for best.pt)."""
    out = {
        "format": "coco",
        "train_images": str(data / "images"),
        "train_annotations": str(data / "train.json"),
        "val_images": str(data / "images"),
        "val_annotations": str(data / f"{val}.json"),
    }
    if other_site:
        out["extra_val"] = {OTHER_SITE_SET: {"val_annotations": str(data / "val_soap.json")}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("runs/real_trees"))
    args = parser.parse_args()
    for row in build(args.data):
        print(
            f"{row['split']:>9}: {row['images']:4d} tiles, {row['boxes']:5d} crowns, median side "
            f"{row['median_side_px']} px"
        )


if __name__ == "__main__":
    main()
