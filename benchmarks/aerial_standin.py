"""A realistic stand-in for a small aerial dataset: 400 px tiles of terrain with tree crowns, one class.

What it imitates (the kind of data our small-data recipe is for, e.g. tree crowns in 10 cm aerial tiles): many
small, similar-looking objects (median about 40 px, 18-90 px) packed in clusters that touch and overlap, on
textured backgrounds (fields, soil, tracks, grain) with things that are not objects (shrubs smaller than any tree,
rocks, dark irregular patches). Crowns are textured, shaded and cast shadows; their colours vary from tile to tile
with the light. A box is the tight box of the crown, not of its shadow.

    python benchmarks/aerial_standin.py OUT_DIR [--train 150] [--val 50] [--seed 0]

writes OUT_DIR/images/*.png, OUT_DIR/train.csv and OUT_DIR/val.csv in the keras-retinanet layout
(path,x1,y1,x2,y2,tree; `path,,,,,` for a tile without trees), which `retinanet train` reads with data.format csv.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 400


def _smooth_noise(rng: np.random.Generator, size: int, scales: tuple[int, ...], weights: tuple[float, ...]) -> np.ndarray:
    """Sum of bilinearly upsampled random grids: [size, size] float in about [-1, 1]."""
    out = np.zeros((size, size), np.float32)
    for cells, weight in zip(scales, weights):
        grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
        img = Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR)
        out += weight * np.asarray(img)
    return out / sum(weights)


def _terrain(rng: np.random.Generator) -> Image.Image:
    """Fields and soil in patches, with grain, a track or two and a tint that changes with the tile."""
    base_a = np.array(rng.choice([[112, 124, 78], [134, 128, 96], [98, 112, 70], [150, 138, 110]]), np.float32)
    base_b = base_a + rng.uniform(-30, 30, 3)
    mix = (_smooth_noise(rng, SIZE, (3, 7), (1.0, 0.5)) + 1) / 2
    rgb = base_a * mix[..., None] + base_b * (1 - mix[..., None])
    rgb += 18 * _smooth_noise(rng, SIZE, (20, 50), (1.0, 0.7))[..., None]
    rgb += rng.normal(0, 6, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):  # tracks and field edges
        a = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(0, SIZE, 2)
        dx, dy = math.cos(a) * SIZE, math.sin(a) * SIZE
        colour = tuple(int(v) for v in np.clip(base_a + rng.uniform(25, 60), 0, 255))
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=int(rng.integers(4, 14)))
    return image.filter(ImageFilter.GaussianBlur(0.7))


def _blob(rng: np.random.Generator, radius: float, irregular: float, points: int = 24) -> list[tuple[float, float]]:
    """A closed outline around (0, 0): a circle of `radius` with lobes."""
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)
    r = radius * (1 + irregular * _lobes(rng, t))
    return list(zip((r * np.cos(t)).tolist(), (r * np.sin(t)).tolist()))


def _lobes(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    out = np.zeros_like(t)
    for k in (3, 5, 7):
        out += rng.uniform(-1, 1) * np.cos(k * t + rng.uniform(0, 2 * math.pi)) / k
    return out


def _paste_shape(image: Image.Image, outline, cx: float, cy: float, fill: np.ndarray, texture: float,
                 rng: np.random.Generator, shade: bool) -> None:
    xs, ys = [x for x, _ in outline], [y for _, y in outline]
    x0, y0 = math.floor(cx + min(xs)) - 2, math.floor(cy + min(ys)) - 2
    w, h = math.ceil(max(xs) - min(xs)) + 5, math.ceil(max(ys) - min(ys)) + 5
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([(cx + x - x0, cy + y - y0) for x, y in outline], fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(0.8))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.broadcast_to(fill, (h, w, 3)).astype(np.float32).copy()
    if shade:  # lit from the top left: brighter there, darker at the far rim
        rx, ry = (xx + x0 - cx) / max(w / 2, 1), (yy + y0 - cy) / max(h / 2, 1)
        rgb *= (1.0 - 0.22 * (rx + ry) - 0.18 * (rx**2 + ry**2))[..., None]
    rgb += texture * rng.normal(0, 1, (h, w, 1)) + 0.4 * texture * rng.normal(0, 1, (h, w, 3))
    patch = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    image.paste(patch, (x0, y0), mask)


def _crown_colour(rng: np.random.Generator, light: float, ground: np.ndarray, blend: float) -> np.ndarray:
    """A crown's green, pulled towards the ground's colour by `blend` (low-contrast tiles)."""
    green = np.array([rng.uniform(30, 70), rng.uniform(62, 104), rng.uniform(28, 58)]) * light
    return (1 - blend) * green + blend * ground


def tile(seed: int) -> tuple[Image.Image, list[list[float]]]:
    """One tile and its tree boxes XYXY (pixels)."""
    rng = np.random.default_rng(seed)
    image = _terrain(rng)
    ground = np.asarray(image, np.float32).reshape(-1, 3).mean(0)
    light = rng.uniform(0.8, 1.2)
    blend = rng.uniform(0.0, 0.45)  # how much crowns take the ground's colour: contrast varies from tile to tile
    # distractors first, under the trees: dark irregular patches, rocks, shrubs smaller than any tree
    for _ in range(int(rng.integers(0, 6))):
        cx, cy = rng.uniform(0, SIZE, 2)
        outline = [(x * rng.uniform(1.2, 2.5), y) for x, y in _blob(rng, rng.uniform(8, 22), 0.9)]
        _paste_shape(image, outline, cx, cy, np.array([60, 62, 50]) * light, 6, rng, shade=False)
    for _ in range(int(rng.integers(0, 8))):
        cx, cy = rng.uniform(0, SIZE, 2)
        _paste_shape(image, _blob(rng, rng.uniform(3, 8), 0.3), cx, cy, np.array([150, 148, 140]) * light, 8, rng,
                     shade=True)  # fmt: skip
    for _ in range(int(rng.integers(0, 60))):  # shrubs and tufts: tree-coloured, smaller than any tree
        cx, cy = rng.uniform(0, SIZE, 2)
        _paste_shape(image, _blob(rng, rng.uniform(2.5, 6.5), 0.4), cx, cy, _crown_colour(rng, light, ground, blend),
                     10, rng, shade=True)  # fmt: skip
    # trees: a few clusters of touching crowns, and some alone
    centres = []
    if rng.random() > 0.08:  # some tiles have no trees at all
        for _ in range(int(rng.integers(1, 6))):
            kx, ky = rng.uniform(30, SIZE - 30, 2)
            spread = rng.uniform(20, 80)
            for _ in range(int(rng.poisson(7))):
                centres.append((kx + rng.normal(0, spread), ky + rng.normal(0, spread)))
        centres += [tuple(rng.uniform(0, SIZE, 2)) for _ in range(int(rng.poisson(2)))]
    boxes, placed = [], []
    shadow = (rng.uniform(3, 7), rng.uniform(3, 7))
    for cx, cy in centres:
        radius = float(np.clip(rng.lognormal(math.log(20), 0.35), 9, 45))
        if not (0 <= cx < SIZE and 0 <= cy < SIZE):
            continue
        if any(math.hypot(cx - px, cy - py) < max(radius, pr) + 0.25 * min(radius, pr) for px, py, pr in placed):
            continue  # crowns touch and overlap, but neither centre is under the other crown: none is hidden
        outline = _blob(rng, radius, 0.25)
        dark = np.array([34, 40, 28]) * light
        _paste_shape(image, outline, cx + shadow[0] * radius / 20, cy + shadow[1] * radius / 20, dark, 3, rng,
                     shade=False)  # fmt: skip
        _paste_shape(image, outline, cx, cy, _crown_colour(rng, light, ground, blend), 14, rng, shade=True)
        xs, ys = [cx + x for x, _ in outline], [cy + y for _, y in outline]
        box = [max(0.0, min(xs)), max(0.0, min(ys)), min(float(SIZE), max(xs)), min(float(SIZE), max(ys))]
        if box[2] - box[0] >= 4 and box[3] - box[1] >= 4:
            boxes.append([round(v, 1) for v in box])
            placed.append((cx, cy, radius))
    image = image.filter(ImageFilter.GaussianBlur(0.5))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 3, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"), boxes


def write(folder: str | Path, n_train: int = 150, n_val: int = 50, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiles and train.csv / val.csv; returns the two CSV paths."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1_000_000)):
        lines = []
        for i in range(n):
            image, boxes = tile(seed * 10_000_019 + offset + i)
            name = f"images/{split}_{i:04d}.png"
            image.save(folder / name)
            lines += [f"{name},{x1},{y1},{x2},{y2},tree" for x1, y1, x2, y2 in boxes] or [f"{name},,,,,"]
        path = folder / f"{split}.csv"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--train", type=int, default=150)
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, val = write(args.output, args.train, args.val, args.seed)
    rows = [line for line in train.read_text().splitlines() if not line.endswith(",,,,,")]
    sizes = sorted(math.sqrt((float(r.split(",")[3]) - float(r.split(",")[1])) * (float(r.split(",")[4]) - float(r.split(",")[2]))) for r in rows)
    print(f"{train}: {len(rows)} boxes, median size {sizes[len(sizes) // 2]:.0f} px; {val}")


if __name__ == "__main__":
    main()
