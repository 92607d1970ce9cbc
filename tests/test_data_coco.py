import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from retinanet.data import CocoDetection, DatasetError, to_coco_dict, write_coco

SIZES = {"a.png": (16, 20), "b.png": (12, 10), "c.png": (8, 8)}  # file -> (H, W)


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)


def _coco() -> dict:
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 20, "height": 16},
            {"id": 11, "file_name": "b.png", "width": 10, "height": 12},
            {"id": 12, "file_name": "c.png", "width": 8, "height": 8},  # no annotations
        ],
        "annotations": [
            {"id": 40, "image_id": 10, "category_id": 7, "bbox": [2, 3, 5, 4], "iscrowd": 0},
            {"id": 41, "image_id": 10, "category_id": 3, "bbox": [0, 0, 20, 16], "iscrowd": 1},
            {"id": 42, "image_id": 11, "category_id": 3, "bbox": [1.5, 2.5, 3, 4]},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    _write_images(tmp_path / "images")
    (tmp_path / "ann.json").write_text(json.dumps(_coco()))
    return tmp_path


def _dataset(folder: Path, data: dict | str | None = None, **kwargs) -> CocoDetection:
    if data is not None:
        (folder / "ann.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return CocoDetection(folder / "images", folder / "ann.json", **kwargs)


def test_reads_boxes_labels_and_categories(coco_dir: Path) -> None:
    ds = _dataset(coco_dir)
    assert len(ds) == 3 and ds.num_classes == 2
    assert ds.categories == [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]  # sorted by id
    assert ds.category_names == ["cat", "dog"]
    assert ds.label_to_category_id == {0: 3, 1: 7}
    r = ds.records[0]
    assert torch.equal(r.boxes, torch.tensor([[2.0, 3.0, 7.0, 7.0], [0.0, 0.0, 20.0, 16.0]]))
    assert r.labels.tolist() == [1, 0] and r.iscrowd.tolist() == [False, True]
    assert ds.records[1].iscrowd.tolist() == [False]  # iscrowd defaults to 0


def test_getitem_gives_image_and_target(coco_dir: Path) -> None:
    image, target = _dataset(coco_dir)[1]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32 and image.shape == (3, 12, 10)
    assert 0.0 <= image.min() and image.max() <= 1.0
    expected = torch.from_numpy(np.array(Image.open(coco_dir / "images" / "b.png"))).permute(2, 0, 1) / 255
    assert torch.allclose(image, expected)
    assert set(target) == {"boxes", "labels", "iscrowd", "image_id", "orig_size"}
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].canvas_size == (12, 10)
    assert target["boxes"].tolist() == [[1.5, 2.5, 4.5, 6.5]]
    assert target["labels"].dtype == torch.int64 and target["iscrowd"].dtype == torch.bool
    assert target["image_id"] == 11 and target["orig_size"] == (12, 10)


def test_image_without_annotations_is_kept_empty(coco_dir: Path) -> None:
    _, target = _dataset(coco_dir)[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["iscrowd"].shape == (0,)


def test_write_coco_round_trips(coco_dir: Path, tmp_path: Path) -> None:
    ds = _dataset(coco_dir)
    images_dir, ann = write_coco(ds, tmp_path / "out")
    again = CocoDetection(images_dir, ann)
    assert again.categories == ds.categories
    for i in range(len(ds)):
        (im1, t1), (im2, t2) = ds[i], again[i]
        assert torch.equal(im1, im2) and torch.equal(t1["boxes"], t2["boxes"])
        assert torch.equal(t1["labels"], t2["labels"]) and torch.equal(t1["iscrowd"], t2["iscrowd"])
    assert to_coco_dict(again)["annotations"][0]["bbox"] == [2.0, 3.0, 5.0, 4.0]  # back to xywh


def _with(change) -> dict:
    data = _coco()
    change(data)
    return data


# a bad annotation is named by its own id and by its position in the file (ids 40, 41, 42 at entries 0, 1, 2)
BAD_ANNOTATIONS = {
    "w <= 0": (_with(lambda d: d["annotations"][1].update(bbox=[5, 5, 0, 3])), "annotation id 41 (entry 1", "w > 0"),
    "h <= 0": (_with(lambda d: d["annotations"][2].update(bbox=[1, 1, 2, -1])), "annotation id 42 (entry 2", "h > 0"),
    "outside": (
        _with(lambda d: d["annotations"][0].update(bbox=[15, 2, 8, 3])),
        "annotation id 40 (entry 0",
        "outside",
    ),
    "unknown category": (
        _with(lambda d: d["annotations"][2].update(category_id=5)),
        "annotation id 42 (entry 2",
        "category_id 5",
    ),
    "unknown image": (
        _with(lambda d: d["annotations"][1].update(image_id=99)),
        "annotation id 41 (entry 1",
        "image_id 99",
    ),
    "bbox not 4 numbers": (
        _with(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])),
        "annotation id 40 (entry 0",
        "[x, y, w, h]",
    ),
    "no id": (
        _with(lambda d: (d["annotations"][1].pop("id"), d["annotations"][1].update(bbox=[5, 5, 0, 3]))),
        "annotation entry 1 of 'annotations'",
        "w > 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
def test_bad_annotation_raises_naming_file_and_index(coco_dir: Path, case: str) -> None:
    data, index, expected = BAD_ANNOTATIONS[case]
    with pytest.raises(DatasetError) as e:
        _dataset(coco_dir, data)
    assert "ann.json" in str(e.value) and index in str(e.value) and expected in str(e.value)


def test_box_within_one_pixel_is_clipped_not_rejected(coco_dir: Path) -> None:
    ds = _dataset(coco_dir, _with(lambda d: d["annotations"][0].update(bbox=[-0.5, 2, 20.8, 3])))
    assert ds.records[0].boxes[0].tolist() == [0.0, 2.0, 20.0, 5.0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "empty file"),
        ("   \n", "empty file"),
        ('{"images": [}', "invalid JSON at line 1"),
        ('{"images": [], "categories": []}', "'annotations'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_file_raises_naming_it(coco_dir: Path, text: str, expected: str) -> None:
    with pytest.raises(DatasetError) as e:
        _dataset(coco_dir, text)
    assert "ann.json" in str(e.value) and expected in str(e.value)


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope.json: annotation file not found"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_missing_image_raises_in_getitem(coco_dir: Path) -> None:
    (coco_dir / "images" / "b.png").unlink()
    ds = _dataset(coco_dir)
    with pytest.raises(DatasetError) as e:
        ds[1]
    assert "b.png" in str(e.value) and "image id 11 'b.png' (entry 1" in str(e.value)
    assert "dataset index 1" in str(e.value)


def test_missing_image_is_found_up_front_by_check_images(coco_dir: Path, capsys) -> None:
    (coco_dir / "images" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"image id 11 'b.png' .*dataset index 1.*not found"):
        _dataset(coco_dir).check_images()
    ds = CocoDetection(coco_dir / "images", coco_dir / "ann.json", skip_bad=True).check_images()
    assert [r.image_id for r in ds.records] == [10, 12]
    (skip,) = ds.skipped
    assert skip.file.endswith("b.png") and skip.index == 1 and "not found" in skip.reason and not skip.box
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("retinanet: skipped an image: ") and "b.png" in err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_raises_in_getitem(coco_dir: Path, damage: str) -> None:
    path = coco_dir / "images" / "a.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DatasetError) as e:
        _dataset(coco_dir)[0]
    assert "a.png" in str(e.value) and "dataset index 0" in str(e.value) and "cannot decode" in str(e.value)


def test_image_size_must_match_annotation(coco_dir: Path) -> None:
    Image.new("RGB", (9, 8)).save(coco_dir / "images" / "c.png")
    with pytest.raises(
        DatasetError, match=r"image id 12 'c.png' \(entry 2 of 'images'\).*9x8 but its annotation says 8x8"
    ):
        _dataset(coco_dir)[2]


def test_skip_bad_drops_a_bad_annotation_alone_in_one_line(coco_dir: Path, capsys) -> None:
    data = _with(lambda d: d["annotations"][2].update(category_id=5))
    boxes_before = len(_dataset(coco_dir).records[1].boxes)
    ds = _dataset(coco_dir, data, skip_bad=True)
    assert [r.image_id for r in ds.records] == [10, 11, 12]  # the image stays, without the bad annotation
    assert len(ds.records[1].boxes) == boxes_before - 1
    (skip,) = ds.skipped
    assert skip.box and skip.index == 1 and skip.file.endswith("b.png")
    err = capsys.readouterr().err
    assert "retinanet: skipped a box: " in err and "annotation id 42 (entry 2 of 'annotations'), of image id 11" in err
    assert "Warning" not in err


def test_skip_bad_returns_the_next_image_for_a_bad_file(coco_dir: Path, capsys) -> None:
    (coco_dir / "images" / "a.png").write_bytes(b"garbage")
    ds = _dataset(coco_dir, skip_bad=True)  # not checked up front: the file breaks after the check
    _, target = ds[0]
    assert target["image_id"] == 11
    assert "retinanet: skipped an image: " in capsys.readouterr().err
    assert ds[1][1]["image_id"] == 11
