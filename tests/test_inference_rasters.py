"""Images past Pillow's limit: read by windows (TIFF with rasterio) or decoded whole when allowed; GeoTIFF
detections in map coordinates."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_run
from PIL import Image

from retinanet.cli import main
from retinanet.inference.rasters import is_large, open_raster
from retinanet.inference.tiling import Window, detect_tiled, detect_windows
from retinanet.ops.postprocess import Detections


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("raster_model") / "run"
    assert main(["train", *tiny_run(run, "train.max_iters=1")]) == 0
    return run / "last.pt"


@pytest.fixture
def small_limit(monkeypatch):
    """Pillow's limit made small, so that small test images stand for huge ones."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)


def _pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def test_windows_read_the_same_detections_as_the_decoded_image():
    image = torch.from_numpy(_pixels(150, 230)).permute(2, 0, 1)
    read_sizes = []

    def read(w: Window) -> torch.Tensor:
        read_sizes.append((w.y1 - w.y0, w.x1 - w.x0))
        return image[:, w.y0 : w.y1, w.x0 : w.x1]

    def detect(crops):  # one box per crop, where its brightest pixel is
        out = []
        for c in crops:
            y, x = divmod(int(c.float().sum(0).argmax()), c.shape[-1])
            out.append(
                Detections(torch.tensor([[x - 2.0, y - 2.0, x + 2.0, y + 2.0]]), torch.tensor([0.9]), torch.tensor([0]))
            )
        return out

    whole = detect_tiled(image, detect, 64, 0.25, batch_size=3)
    windows = detect_windows(read, (150, 230), detect, 64, 0.25, batch_size=3)
    torch.testing.assert_close(whole.boxes, windows.boxes)
    assert max(h for h, _ in read_sizes) <= 64 and max(w for _, w in read_sizes) <= 64  # never more than a tile


def test_an_image_past_the_limit_names_the_option_then_is_detected_in_tiles(tmp_path, checkpoint, small_limit, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(_pixels(150, 200)).save(images / "big.png")  # 30,000 px, past the 20,000 px Pillow refuses
    Image.fromarray(_pixels(64, 64, 1)).save(images / "small.png")
    assert is_large(images / "big.png") and not is_large(images / "small.png")
    out = tmp_path / "out"
    assert main(["detect", str(images), "--checkpoint", str(checkpoint), "--output", str(out), "--tile", "64"]) == 2
    err = capsys.readouterr().err
    assert "big.png: 200x150 px" in err and "past Pillow's limit" in err and "--allow-large-images" in err
    assert "Traceback" not in err
    assert (
        main(
            [
                "detect",
                str(images),
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(out),
                "--tile",
                "64",
                "--allow-large-images",
                "--score-thresh",
                "0.0",
            ]
        )
        == 0
    )
    records = json.loads((out / "detections.json").read_text())
    assert [(r["file"].split("/")[-1], r["width"], r["height"]) for r in records] == [
        ("big.png", 200, 150),
        ("small.png", 64, 64),
    ]
    assert "drawing" not in records[0] and "drawing" in records[1]  # the large image is not drawn
    assert "past Pillow's limit were detected but not drawn" in capsys.readouterr().err
    assert not (out / "detections.geojson").exists()  # a PNG has no map coordinates


def test_a_geotiff_is_read_by_windows_and_its_detections_written_in_map_coordinates(tmp_path, checkpoint, small_limit):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    path = tmp_path / "ortho.tif"
    pixels = _pixels(200, 300).transpose(2, 0, 1)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=300,
        height=200,
        count=3,
        dtype="uint8",
        crs="EPSG:32612",
        transform=from_origin(500000.0, 4000000.0, 0.1, 0.1),
        tiled=True,
        blockxsize=64,
        blockysize=64,
    ) as dst:
        dst.write(pixels)
    raster = open_raster(path)  # no --allow-large-images needed: rasterio reads windows
    assert (raster.height, raster.width, raster.crs) == (200, 300, "EPSG:32612")
    torch.testing.assert_close(raster.read(Window(10, 20, 40, 60)), torch.from_numpy(pixels[:, 10:40, 20:60].copy()))
    out = tmp_path / "out"
    assert (
        main(
            [
                "detect",
                str(path),
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(out),
                "--tile",
                "64",
                "--score-thresh",
                "0.0",
                "--max-detections",
                "5",
            ]
        )
        == 0
    )
    record = json.loads((out / "detections.json").read_text())[0]
    geo = json.loads((out / "detections.geojson").read_text())
    assert geo["crs"]["properties"]["name"] == "EPSG:32612"
    assert len(geo["features"]) == len(record["detections"]) > 0
    x1, y1, x2, y2 = record["detections"][0]["box"]
    ring = geo["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == pytest.approx([500000.0 + 0.1 * x1, 4000000.0 - 0.1 * y1])
    assert ring[2] == pytest.approx([500000.0 + 0.1 * x2, 4000000.0 - 0.1 * y2])


def test_a_16_bit_raster_is_scaled_by_its_whole_range(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    path = tmp_path / "dem.tif"
    values = np.linspace(1000, 3000, 100 * 120).reshape(1, 100, 120).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=120, height=100, count=1, dtype="uint16") as dst:
        dst.write(values)
    raster = open_raster(path)
    corner, whole = raster.read(Window(0, 0, 10, 10)), raster.read_all()
    assert whole.dtype == torch.uint8 and whole.shape == (3, 100, 120)
    assert int(whole.min()) == 0 and int(whole.max()) == 255
    assert 20 <= int(corner.max()) <= 26  # the top tenth of the rows: a tenth of the whole range (its own: 255)


def test_a_training_image_past_the_limit_is_one_line_naming_tiles(tmp_path, monkeypatch):
    from retinanet.data import CsvDetection, DatasetError

    Image.fromarray(_pixels(40, 40)).save(tmp_path / "a.png")
    (tmp_path / "ann.csv").write_text("a.png,1,1,20,20,tree\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 px: past twice the limit, which Pillow refuses
    with pytest.raises(DatasetError, match=r"a\.png is past Pillow's limit .* cut it into tiles"):
        CsvDetection(tmp_path / "ann.csv").check_images()
