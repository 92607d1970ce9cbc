from pathlib import Path

import pytest
import torch
from PIL import Image

from retinanet.data import VOC_CLASSES, DatasetError, VocDetection


def _object(name: str, box: tuple, difficult: int = 0) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def _xml(width: int, height: int, objects: list[str]) -> str:
    return (
        f"<annotation><filename>x.jpg</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{''.join(objects)}</annotation>"
    )


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    Image.new("RGB", (20, 16), (200, 10, 10)).save(tmp_path / "JPEGImages" / "000001.jpg")
    Image.new("RGB", (12, 12), (10, 200, 10)).save(tmp_path / "JPEGImages" / "000002.jpg")
    (tmp_path / "Annotations" / "000001.xml").write_text(
        _xml(20, 16, [_object("dog", (1, 1, 10, 8)), _object("person", (5, 6, 20, 16), difficult=1)])
    )
    (tmp_path / "Annotations" / "000002.xml").write_text(_xml(12, 12, []))
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    return tmp_path


def test_reads_voc_with_one_based_boxes(voc_root: Path) -> None:
    ds = VocDetection(voc_root, split="train")
    assert len(ds) == 2 and ds.num_classes == 20 and ds.category_names == list(VOC_CLASSES)
    assert ds.categories[0] == {"id": 1, "name": "aeroplane"}
    r = ds.records[0]
    # 1-based inclusive (1, 1, 10, 8) covers 0-based pixels 0..9 x 0..7: pixel edges (0, 0, 10, 8)
    assert r.boxes.tolist() == [[0.0, 0.0, 10.0, 8.0], [4.0, 5.0, 20.0, 16.0]]
    assert r.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert r.iscrowd.tolist() == [False, True]  # difficult
    image, target = ds[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.float32
    assert target["image_id"] == 0 and target["orig_size"] == (16, 20)
    assert target["boxes"].canvas_size == (16, 20)


def test_image_without_objects_and_split_file_path(voc_root: Path) -> None:
    ds = VocDetection(voc_root, split=voc_root / "ImageSets" / "Main" / "train.txt", class_names=("dog", "person"))
    assert ds.categories == [{"id": 1, "name": "dog"}, {"id": 2, "name": "person"}]
    _, target = ds[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


BAD = {
    "unknown class": ([_object("dog", (1, 1, 5, 5)), _object("unicorn", (1, 1, 5, 5))], "object 1", "'unicorn'"),
    "x2 <= x1": ([_object("dog", (8, 1, 5, 5))], "object 0", "x2 (5.0) <= x1 (7.0)"),
    "y2 <= y1": ([_object("dog", (1, 1, 5, 5)), _object("cat", (1, 9, 5, 7))], "object 1", "y2 (7.0) <= y1 (8.0)"),
    "outside": ([_object("dog", (1, 1, 30, 5))], "object 0", "outside the 20x16 image"),
    "not a number": ([_object("dog", (1, "one", 5, 5))], "object 0", "<ymin> is 'one'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_object_raises_naming_xml_and_object(voc_root: Path, case: str) -> None:
    objects, index, expected = BAD[case]
    (voc_root / "Annotations" / "000001.xml").write_text(_xml(20, 16, objects))
    with pytest.raises(DatasetError) as e:
        VocDetection(voc_root, split="train")
    assert "000001.xml" in str(e.value) and index in str(e.value) and expected in str(e.value)


def test_malformed_and_missing_xml(voc_root: Path) -> None:
    (voc_root / "Annotations" / "000001.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match="000001.xml: malformed XML"):
        VocDetection(voc_root, split="train")
    (voc_root / "Annotations" / "000001.xml").unlink()
    with pytest.raises(DatasetError, match=r"image 0 \('000001' in train.txt\): annotation file not found"):
        VocDetection(voc_root, split="train")


def test_missing_or_empty_split_file(voc_root: Path) -> None:
    with pytest.raises(DatasetError, match="val.txt: image set file not found"):
        VocDetection(voc_root, split="val")
    (voc_root / "ImageSets" / "Main" / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match="val.txt: empty image set file"):
        VocDetection(voc_root, split="val")


def test_missing_and_corrupt_image_raise_in_getitem(voc_root: Path) -> None:
    (voc_root / "JPEGImages" / "000002.jpg").unlink()
    ds = VocDetection(voc_root, split="train")
    with pytest.raises(DatasetError, match=r"000002.xml: image 1 .*dataset index 1.*not found.*000002.jpg"):
        ds[1]
    (voc_root / "JPEGImages" / "000001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DatasetError, match=r"dataset index 0.*cannot decode.*000001.jpg"):
        ds[0]


def test_skip_bad_drops_a_bad_object_alone(voc_root: Path, capsys) -> None:
    objects = [_object("unicorn", (1, 1, 5, 5)), _object("dog", (2, 2, 9, 9))]
    (voc_root / "Annotations" / "000001.xml").write_text(_xml(20, 16, objects))
    ds = VocDetection(voc_root, split="train", skip_bad=True)
    assert len(ds) == 2 and len(ds.records[0].boxes) == 1  # the image keeps its dog
    (skip,) = ds.skipped
    assert skip.box and "000001.xml: object 0: unknown class 'unicorn'" in skip.reason
    assert "retinanet: skipped a box: " in capsys.readouterr().err
