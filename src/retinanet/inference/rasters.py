"""Images too large to decode whole (orthomosaics, sky surveys): read window by window for tiled detection, in
memory bounded by the tile batch, and their georeferencing kept.

Pillow refuses an image past twice `PIL.Image.MAX_IMAGE_PIXELS` (about 179 megapixels by default) as a possible
decompression bomb. Such an image is read here:
- TIFF and GeoTIFF (and GDAL's other rasters: .jp2, .img, .vrt), window by window with rasterio (the `geo` extra:
  `pip install "retinanet[geo]"`): the memory is that of one batch of tiles. A georeferenced raster keeps its CRS
  and affine transform, and detection then also writes its boxes in map coordinates (detections.geojson).
- Any other format, decoded whole, only where the user allows it (`detect --allow-large-images`): the memory is
  then the image's, width x height x 3 bytes.

16-bit and float rasters are scaled to 0-255 by the range of the whole raster (read from a decimated copy, so that
every tile is scaled alike), as retinanet.data.base.to_rgb scales a small image by its own range.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from retinanet.data.base import to_rgb
from retinanet.inference.tiling import Window
from retinanet.runtime.machine import fixed_mmap_threshold
from retinanet.runtime.outputs import atomic_write

__all__ = ["GDAL_SUFFIXES", "Raster", "image_pixels", "is_large", "open_raster", "pixel_limit", "write_geojson"]

GDAL_SUFFIXES = {".tif", ".tiff", ".jp2", ".img", ".vrt"}
GDAL_CACHE_MB = 64  # GDAL's cache of decoded blocks while a raster is read: a few rows of tiles, not the image
RANGE_SIDE = 1024  # the decimated copy that sets a 16-bit raster's range: at most this many px on its longer side


@dataclass
class Raster:
    """An image read by windows. read(window) -> uint8 [3, h, w] of rows y0..y1 and columns x0..x1.

    crs: the coordinate reference system ("EPSG:32612"), None where the raster has none. transform: its affine
    transform (a, b, c, d, e, f): a pixel corner (col, row) is at x = a col + b row + c, y = d col + e row + f."""

    path: Path
    height: int
    width: int
    read: Callable[[Window], Tensor]
    crs: str | None = None
    transform: tuple[float, float, float, float, float, float] | None = None
    close: Callable[[], None] = field(default=lambda: None)

    def read_all(self) -> Tensor:
        return self.read(Window(0, 0, self.height, self.width))


def image_pixels(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, whatever its size (nothing decoded); None where it cannot be read."""
    path = Path(path)
    try:
        if path.suffix.lower() in GDAL_SUFFIXES and _has_rasterio():
            import rasterio

            with warnings.catch_warnings(), rasterio.open(path) as src:
                warnings.simplefilter("ignore")  # NotGeoreferencedWarning: a plain TIFF is fine here
                return int(src.width), int(src.height)
        with _no_pixel_limit(), Image.open(path) as im:
            return im.size
    except Exception:  # the reader's own error is said where the file is read
        return None


def pixel_limit() -> int | None:
    """The most pixels Pillow decodes: twice Image.MAX_IMAGE_PIXELS (past it Pillow refuses the image as a possible
    decompression bomb; past MAX_IMAGE_PIXELS itself it only warns); None where the limit is lifted."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS is not None else None


def is_large(path: str | Path) -> bool:
    """Whether the image is past Pillow's limit (`pixel_limit`), so that Pillow would refuse it."""
    limit = pixel_limit()
    size = image_pixels(path)
    return limit is not None and size is not None and size[0] * size[1] > limit


def open_raster(path: str | Path, allow_large: bool = False) -> Raster:
    """The image at `path` as a Raster: by windows with rasterio for TIFF and GDAL's formats, else decoded whole
    where `allow_large` says so; a ValueError naming the option (and the memory) otherwise."""
    path = Path(path)
    gdal = path.suffix.lower() in GDAL_SUFFIXES
    if gdal and _has_rasterio():
        return _rasterio_raster(path)
    if not allow_large:
        width, height = image_pixels(path) or (0, 0)
        gb = width * height * 3 / 1e9
        by_windows = (
            ' or install rasterio (pip install "retinanet[geo]") to read it by windows in little memory' if gdal else ""
        )
        raise ValueError(
            f"{path}: {width}x{height} px ({width * height / 1e6:.0f} megapixels) is past Pillow's limit "
            f"of {(pixel_limit() or 0) / 1e6:.0f} megapixels (a guard against decompression bombs): "
            f"allow it with --allow-large-images (decoded whole: about {gb:.1f} GB of memory)"
            f"{by_windows}"
        )
    with _no_pixel_limit(), Image.open(path) as im:
        pixels = torch.from_numpy(to_rgb(im).copy()).permute(2, 0, 1)
    return Raster(path, int(pixels.shape[1]), int(pixels.shape[2]), lambda w: pixels[:, w.y0 : w.y1, w.x0 : w.x1])


def _rasterio_raster(path: Path) -> Raster:
    import rasterio
    from rasterio.windows import Window as RioWindow

    fixed_mmap_threshold()  # GDAL's reads between batches would otherwise grow the heap

    env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)  # GDAL's block cache, else 5% of the machine's memory
    env.__enter__()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning
            src = rasterio.open(path)
    except BaseException:
        env.__exit__(None, None, None)
        raise
    bands = [1, 1, 1] if src.count < 3 else [1, 2, 3]
    dtype = np.dtype(src.dtypes[0])
    scale = None if dtype == np.uint8 else _range(src, bands)

    def read(w: Window) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = src.read(bands, window=RioWindow(w.x0, w.y0, w.x1 - w.x0, w.y1 - w.y0))
        if scale is not None:
            low, high = scale
            data = ((data.astype(np.float32) - low) * (255.0 / max(high - low, 1e-12))).clip(0, 255).round()
        return torch.from_numpy(np.ascontiguousarray(data.astype(np.uint8)))

    georeferenced = src.crs is not None
    t = src.transform
    return Raster(
        path,
        int(src.height),
        int(src.width),
        read,
        crs=src.crs.to_string() if georeferenced else None,
        transform=(t.a, t.b, t.c, t.d, t.e, t.f) if georeferenced else None,
        close=lambda: (src.close(), env.__exit__(None, None, None)),
    )


def _range(src: Any, bands: Sequence[int]) -> tuple[float, float]:
    """(darkest, brightest) of a raster's bands, from a decimated read of at most RANGE_SIDE px a side."""
    factor = max(1, -(-max(src.width, src.height) // RANGE_SIDE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = src.read(
            sorted(set(bands)), out_shape=(len(set(bands)), max(1, src.height // factor), max(1, src.width // factor))
        )
    finite = small[np.isfinite(small)] if small.dtype.kind == "f" else small
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def write_geojson(path: str | Path, records: list[dict[str, Any]], rasters: dict[str, Raster]) -> Path | None:
    """detections.geojson: every detection of a georeferenced raster as a polygon in the raster's CRS and map
    coordinates (properties: file, score, label, name, category_id); None where no raster is georeferenced. Several
    rasters in different CRSs are refused (one file holds one CRS)."""
    geo = {file: r for file, r in rasters.items() if r.transform is not None}
    if not geo:
        return None
    crss = sorted({r.crs for r in geo.values() if r.crs})
    if len(crss) > 1:
        raise ValueError(f"detections.geojson: the rasters are in different CRSs {crss}; detect them apart")
    features = []
    for record in records:
        raster = geo.get(record["file"])
        if raster is None:
            continue
        a, b, c, d, e, f = raster.transform  # type: ignore[misc]
        for det in record["detections"]:
            x1, y1, x2, y2 = det["box"]
            corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]
            ring = [[a * col + b * row + c, d * col + e * row + f] for col, row in corners]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {
                        "file": record["file"],
                        "score": det["score"],
                        "label": det["label"],
                        "name": det["name"],
                        "category_id": det["category_id"],
                    },
                }
            )
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if crss:  # RFC 7946 assumes WGS 84; a raster's own CRS is named as GDAL and QGIS read it
        collection["crs"] = {"type": "name", "properties": {"name": crss[0]}}
    return atomic_write(path, json.dumps(collection))


def _has_rasterio() -> bool:
    return importlib.util.find_spec("rasterio") is not None


class _no_pixel_limit:
    """Pillow's decompression-bomb limit lifted for a header read or a decode the user allowed."""

    def __enter__(self) -> None:
        self.limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None

    def __exit__(self, *exc: Any) -> None:
        Image.MAX_IMAGE_PIXELS = self.limit
