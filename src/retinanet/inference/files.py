"""Batch inference over many image files: a folder, a glob, a list file; several images per forward pass, decoded
and resized in DataLoader workers; results as JSON (COCO results, and every image with its detections), an
optional keras-retinanet CSV, and annotated images.

    retinanet detect --checkpoint last.pt photos/ "scans/*.tif" todo.txt --output out/ --batch-size 4 --workers 2
    retinanet detect --onnx model.onnx photos/ --output out/ --csv              # ONNX Runtime (--engine openvino)
    retinanet detect --checkpoint last.pt big.tif --tile 800 --overlap 0.2      # large images in tiles

Writes in the output folder:
    detections.json  per image, in input order, including images with no detections: {"file", "image_id",
                     "width", "height", "detections": [{"box": [x1, y1, x2, y2], "score", "label", "category_id",
                     "name"}], "drawing": its annotated image}; then each file skip_bad left out: {"file",
                     "skipped": why, "detections": []}
    skipped.json     (when skip_bad left files out) [{"file", "reason"}]
    results.json     the COCO results format, [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}], with the
                     image_ids of detections.json and the model's category ids
    detections.csv   (csv=True) keras-retinanet's layout, one box per line `path,x1,y1,x2,y2,class_name` in whole
                     pixels and `path,,,,,` for an image with no detections: readable back as training data
    labels/NAME.txt  (yolo_txt=True) Ultralytics' prediction layout, one file per image (empty: no detections), one
                     box per line `class cx cy w h score`: the class its 0-based index among the model's classes, the
                     box's centre and size as fractions of the image's width and height
    detections.geojson  (georeferenced rasters) every detection as a polygon in the raster's CRS and map coordinates
    NAME.png         (draw) each image with its detections drawn: labelled while the labels stay readable ("auto"),
                     or always ("labels"), or as boxes alone ("boxes")
A file that cannot be read stops the run with its name, or with skip_bad is said in one line and left out of every
output but detections.json and skipped.json, which name it.
"""

from __future__ import annotations

import contextlib
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from retinanet.data.base import notice
from retinanet.inference.drawing import DRAW_MODES, save_detections_image
from retinanet.inference.predictor import Prediction, Predictor, read_image
from retinanet.inference.rasters import Raster, image_pixels, is_large, open_raster, write_geojson
from retinanet.inference.writers import DetectionWriter

__all__ = ["IMAGE_SUFFIXES", "InferenceResult", "draw_mode", "image_files", "run_inference", "size_hints"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".lst"}
_GLOB_CHARS = set("*?[")


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by `inputs`, in order: files as given; folders' images (non-recursive, sorted by name);
    glob patterns' matches (sorted; ** recurses); list files (.txt, .lst), one image path per line, relative ones
    against the list file's folder, blank lines and lines starting with # skipped. A file named by several inputs
    comes once, where it is first named."""
    files: list[Path] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            files += _listed(path)
        elif path.is_file():
            files.append(path)
        elif _GLOB_CHARS & set(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise ValueError(f"no files match {item!r}")
            files += [p for p in matches if p.is_file()]
        else:
            raise ValueError(f"input not found: {path}")
    if not files:
        raise ValueError(f"no images found in {[str(i) for i in inputs]}")
    seen: set[Path] = set()
    unique = []
    for path in files:  # a file named twice (by a glob and a list file) is detected once
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def _listed(list_file: Path) -> list[Path]:
    out = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            out.append(path if path.is_absolute() else list_file.parent / path)
    if not out:
        raise ValueError(f"{list_file}: empty list file; expected one image path per line")
    return out


# ----------------------------------------------------------------------------------------------------------------
class _Sample(NamedTuple):
    """One file as a worker delivers it: the network input and its scale (None when tiling), the decoded uint8
    image (when it is needed: drawing, tiling), the original (H, W); or the error that reading it raised."""

    index: int
    path: Path
    prepared: Tensor | None
    scale: tuple[float, float] | None
    image: Tensor | None
    size_hw: tuple[int, int] | None
    error: str | None
    large: bool = False  # past Pillow's limit: not decoded here, read by windows in the main process


class _ImageFiles(Dataset):
    """Decodes (and, given `prepare`, resizes) image files in DataLoader workers; an unreadable file becomes a
    sample carrying its error, so that the main process decides whether it stops the run."""

    def __init__(self, files: list[Path], prepare: Callable | None, keep_image: bool):
        self.files, self.prepare, self.keep_image = files, prepare, keep_image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> _Sample:
        path = self.files[index]
        if is_large(path):
            width, height = image_pixels(path) or (0, 0)
            return _Sample(index, path, None, None, None, (height, width), None, large=True)
        try:
            image = read_image(path)
        except ValueError as exc:
            return _Sample(index, path, None, None, None, None, str(exc))
        prepared, scale = self.prepare(image) if self.prepare is not None else (None, None)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        return _Sample(index, path, prepared, scale, image if self.keep_image else None, size, None)


def draw_mode(draw: bool | str) -> str | None:
    """The drawing mode of a `draw` argument (True: "auto"; False or "none": no drawing; else one of
    retinanet.inference.drawing.DRAW_MODES), or a ValueError naming the choices."""
    if draw is True or draw is False:
        return "auto" if draw else None
    if draw == "none":
        return None
    if draw not in DRAW_MODES:
        raise ValueError(f"--draw {draw!r}: expected one of {[*DRAW_MODES, 'none']}")
    return draw


@dataclass
class InferenceResult:
    """output: the folder written; skipped: the files left out, with why; written: every file the run wrote;
    images, detections: how many images were read and how many detections they hold. `records` (as in
    detections.json) is read back from the file when asked for: a run keeps no image's detections in memory."""

    output: Path
    skipped: list[tuple[str, str]]
    written: list[Path] = field(default_factory=list)
    images: int = 0
    detections: int = 0

    @property
    def records(self) -> list[dict[str, Any]]:
        """Per image read, in input order, as in detections.json (the files skip_bad left out are not among them)."""
        found = json.loads((self.output / "detections.json").read_text(encoding="utf-8"))
        return [r for r in found if "skipped" not in r]


def run_inference(
    predictor: Predictor,
    files: Sequence[str | Path],
    output: str | Path,
    batch_size: int = 4,
    workers: int = 0,
    skip_bad: bool = False,
    csv_file: bool = False,
    draw: bool | str = True,
    progress: bool = True,
    yolo_txt: bool = False,
    allow_large: bool = False,
) -> InferenceResult:
    """Detect objects in every file with `predictor` (eager, or an engine's), batch_size images per forward pass
    (tiles per pass, with a tiling predictor), `workers` processes decoding and resizing; write the outputs of the
    module docstring to `output`. An unreadable file raises a ValueError naming it, or with skip_bad is warned
    about and skipped. An image past Pillow's limit is read by windows (retinanet.inference.rasters: TIFFs with
    rasterio; other formats decoded whole where `allow_large` says so); it is not drawn, and a georeferenced one
    also goes to detections.geojson in map coordinates.

    The outputs are streamed: each image's detections go to the files as soon as they are found, and memory stays
    flat over any number of images. Each file is written under a temporary name and takes its own name only when
    every image is done: a run that fails leaves an earlier detection's files whole."""
    files = [Path(f) for f in files]
    out = Path(output)
    mode = draw_mode(draw)
    draw = mode is not None
    tiled = predictor.tile is not None
    dataset = _ImageFiles(files, None if tiled else predictor.prepare_fn, keep_image=draw or tiled)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list, persistent_workers=False)
    names = _drawing_names(files)
    result = InferenceResult(out, [])
    sizes: list[dict[str, Any]] = []  # per image: file, width, height and its number of detections, for the hints
    rasters: dict[str, Raster] = {}
    raster_records: list[dict[str, Any]] = []
    with (
        contextlib.ExitStack() as streams,
        tqdm(total=len(files), unit="image", desc="detect", disable=not progress) as bar,
    ):
        outputs = DetectionWriter(streams, out, predictor.categories, csv_file, yolo_txt)
        for batch in loader:
            good = [s for s in batch if s.error is None and not s.large]
            found_in = dict(zip((s.index for s in good), _predict(predictor, good, tiled)))
            for s in batch:  # in input order
                if s.large:
                    try:
                        raster = open_raster(s.path, allow_large)
                    except ValueError as exc:
                        s = s._replace(error=str(exc))
                    else:
                        found_in[s.index] = predictor.predict_raster(raster)
                        raster.close()
                        rasters[str(s.path)] = raster
                if s.error is not None:
                    if not skip_bad:
                        raise ValueError(s.error)
                    notice(f"skipped an image: {s.error}")
                    result.skipped.append((str(s.path), s.error))
                    continue
                found = found_in.pop(s.index)
                drawn = draw and not s.large  # an image too large to decode is not drawn
                record = _record(s, found, result.images + 1, names[s.index] if drawn else None)
                outputs.add(record, found)
                result.images += 1
                result.detections += len(record["detections"])
                sizes.append({**{k: record[k] for k in ("file", "width", "height")}, "detections": len(found.scores)})
                if s.large:
                    raster_records.append(record)
                if drawn:
                    result.written.append(
                        save_detections_image(
                            out / names[s.index],
                            s.image.float() / 255,
                            found.boxes,
                            found.scores,
                            found.labels,
                            predictor.class_names,
                            mode,
                        )
                    )
            bar.update(len(batch))
        result.written += outputs.finish(result.skipped)
    if draw and rasters:
        notice(
            f"{len(rasters)} image(s) past Pillow's limit were detected but not drawn (e.g. "
            f"{Path(next(iter(rasters))).name})"
        )
    for line in size_hints(predictor, sizes):
        notice(line)
    result.written += [p for p in [write_geojson(out / "detections.geojson", raster_records, rasters)] if p is not None]
    return result


SHRINK_HINT = 1.5  # an image (or tile) shrunk by more than this to the model's size gets a line naming --tile


def shrink_factor(height: int, width: int, min_size: int, max_size: int) -> float:
    """How many times an image of this size is shrunk by the model's resize (shorter side to min_size, longer at
    most max_size); below 1 where it is enlarged."""
    return 1.0 / min(min_size / min(height, width), max_size / max(height, width))


def _count(record: dict[str, Any]) -> int:
    found = record["detections"]
    return found if isinstance(found, int) else len(found)


def size_hints(predictor: Predictor, records: list[dict[str, Any]], shrunk: float = SHRINK_HINT) -> list[str]:
    """One-line hints (records: file, width, height, and detections: the image's, or their number) for results that the
    model's size limited: images, or tiles, shrunk by more than `shrunk` times to the model's size (small objects vanish
    when shrunk), with the --tile that keeps them at the model's scale; images, or tiles, whose detections reached the
    model's cap. Tiles are named only where they would help (an image shrunk to the model's size)."""
    cfg, lines = predictor.config, []
    cap = cfg.detections_per_image
    if predictor.tile is None:
        large = [r for r in records if shrink_factor(r["height"], r["width"], cfg.min_size, cfg.max_size) > shrunk]
        if large:
            r = large[0]
            factor = shrink_factor(r["height"], r["width"], cfg.min_size, cfg.max_size)
            lines.append(
                f"hint: {len(large)} image(s) larger than the model's {cfg.min_size}-{cfg.max_size} px were "
                f"shrunk to it (e.g. {Path(r['file']).name}, {r['width']}x{r['height']}, {factor:.1f}x), "
                "and small objects vanish when shrunk: detect them in tiles with "
                f"--tile {cfg.min_size}"
            )
        capped = [r for r in records if _count(r) >= cap]
        if capped:
            tiles = any(shrink_factor(r["height"], r["width"], cfg.min_size, cfg.max_size) > 1 for r in capped)
            tiles_or = f"detect in tiles (--tile {cfg.min_size}) or " if tiles else ""
            lines.append(
                f"warning: {len(capped)} image(s) reached the model's cap of {cap} detections (e.g. "
                f"{Path(capped[0]['file']).name}): more objects may be there; {tiles_or}raise the cap "
                "with --max-detections"
            )
        return lines
    factor = shrink_factor(predictor.tile, predictor.tile, cfg.min_size, cfg.max_size)
    if factor > shrunk:
        lines.append(
            f"hint: tiles of {predictor.tile} px were shrunk {factor:.1f}x to the model's {cfg.min_size}-"
            f"{cfg.max_size} px, and small objects vanish when shrunk: --tile {cfg.min_size} keeps them at "
            "the model's scale"
        )
    if predictor.capped_tiles:
        lines.append(
            f"warning: {predictor.capped_tiles} tile(s) reached the model's cap of {cap} detections per "
            "tile: more objects may be there; raise the cap with --max-detections, or use smaller tiles"
        )
    return lines


def _predict(predictor: Predictor, samples: list[_Sample], tiled: bool) -> list[Prediction]:
    if not samples:
        return []
    sources = [str(s.path) for s in samples]
    if tiled:  # one image at a time, its tiles batched
        return predictor.predict_tensors([s.image for s in samples], sources)
    found = predictor.detect_prepared([s.prepared for s in samples], [s.scale for s in samples])
    return [predictor.to_prediction(d, s.size_hw, src) for d, s, src in zip(found, samples, sources)]


def _record(sample: _Sample, found: Prediction, image_id: int, drawing: str | None) -> dict[str, Any]:
    height, width = sample.size_hw
    return {
        "file": str(sample.path),
        "image_id": image_id,
        "width": width,
        "height": height,
        "detections": found.to_dicts(),
        **({"drawing": drawing} if drawing else {}),
    }


def _drawing_names(files: list[Path]) -> list[str]:
    """NAME.png per file; a name met again gets its position appended, so that no drawing overwrites another."""
    seen: set[str] = set()
    names = []
    for i, path in enumerate(files):
        name = f"{path.stem}.png" if path.stem not in seen else f"{path.stem}_{i}.png"
        seen.add(path.stem)
        names.append(name)
    return names
