import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from retinanet.config import DataConfig, ModelConfig
from retinanet.data import DatasetError, YoloDetection, build_dataset, val_dataset
from retinanet.data.yolo import label_path


def _image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 60)).save(path)


def _labels(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def yolo_dir(tmp_path: Path) -> Path:
    """An Ultralytics export: data.yaml with names as a mapping, images/ and labels/ per split."""
    root = tmp_path / "export"
    _image(root / "images" / "train" / "a.png", (40, 20))
    _labels(root / "labels" / "train" / "a.txt", "0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.1 0.2\n\n")
    _image(root / "images" / "train" / "b.jpg", (30, 30))  # no label file: an image of background only
    _image(root / "images" / "train" / "sub" / "c.png", (10, 10))  # a polygon: the box around it
    _labels(root / "labels" / "train" / "sub" / "c.txt", "1 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n")
    _image(root / "images" / "val" / "v.png", (40, 20))
    _labels(root / "labels" / "val" / "v.txt", "1 0.5 0.5 1.0 1.0\n")
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnc: 2\nnames:\n  0: tree\n  1: car\n"
    )
    return root


def test_reads_the_ultralytics_layout_in_pixels(yolo_dir: Path) -> None:
    ds = YoloDetection(yolo_dir / "data.yaml", "train")
    assert ds.categories == [{"id": 0, "name": "tree"}, {"id": 1, "name": "car"}]
    assert [r.path.name for r in ds.records] == ["a.png", "b.jpg", "c.png"]
    a, b, c = ds.records
    # cx 0.5 cy 0.5 w 0.5 h 0.5 of a 40 x 20 image: x 10..30, y 5..15; then cx 0.25, cy 0.25, w 0.1, h 0.2
    torch.testing.assert_close(a.boxes, torch.tensor([[10.0, 5.0, 30.0, 15.0], [8.0, 3.0, 12.0, 7.0]]))
    assert a.labels.tolist() == [0, 1] and (a.width, a.height) == (40, 20) and a.box_names == ["line 1", "line 2"]
    assert b.boxes.shape == (0, 4)
    torch.testing.assert_close(c.boxes, torch.tensor([[1.0, 2.0, 5.0, 6.0]]))
    assert c.labels.tolist() == [1]
    image, target = ds[0]
    assert image.shape == (3, 20, 40) and target["labels"].tolist() == [0, 1]


def test_label_paths_follow_ultralytics_rule(tmp_path: Path) -> None:
    assert label_path(Path("/d/images/train/x.jpg")) == Path("/d/labels/train/x.txt")
    assert label_path(Path("/images/d/images/t/x.png")) == Path("/images/d/labels/t/x.txt")  # the last images/
    assert label_path(Path("/d/pics/x.jpg")) == Path("/d/pics/x.txt")  # no images/ folder: beside the image


def test_names_as_a_list_and_splits_as_list_files(yolo_dir: Path) -> None:
    (yolo_dir / "train.txt").write_text("# the training images\nimages/train/a.png\n./images/train/b.jpg\n")
    spec = {"path": str(yolo_dir), "train": ["train.txt", "images/train/sub"], "names": ["tree", "car"]}
    (yolo_dir / "list.yaml").write_text(yaml.safe_dump(spec))
    ds = YoloDetection(yolo_dir / "list.yaml", "train")
    assert [r.path.name for r in ds.records] == ["a.png", "b.jpg", "c.png"]
    assert ds.category_names == ["tree", "car"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("names: [tree]\nnc: 2\ntrain: images/train\n", r"nc = 2 but names holds 1 classes"),
        ("train: images/train\n", r"'names' must list the class names"),
        ("names: {0: tree, 2: car}\ntrain: images/train\n", r"class indices are \[0, 2\]"),
        ("names: [tree, car]\n", r"no 'train' images named"),
        ("names: [tree, car]\ntrain: nowhere\n", r"nowhere is neither a folder of images nor a \.txt list"),
        ("names: [tree\n", r"not valid YAML"),
    ],
)
def test_data_yaml_mistakes_name_the_file(yolo_dir: Path, text: str, expected: str) -> None:
    (yolo_dir / "bad.yaml").write_text(text)
    with pytest.raises(DatasetError, match=expected) as info:
        YoloDetection(yolo_dir / "bad.yaml", "train")
    assert "bad.yaml" in str(info.value)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("2 0.5 0.5 0.2 0.2", r"line 2: class 2 is not a class index 0\.\.1"),
        ("0 20 10 4 4", r"line 2: coordinates .* are not fractions of the image"),
        ("0 0.5 0.5 0.2", r"line 2: 4 numbers; expected 'class cx cy w h'"),
        ("tree 0.5 0.5 0.2 0.2", r"line 2: 'tree 0.5 0.5 0.2 0.2'; expected 'class cx cy w h'"),
        ("0 0.5 0.5 0.0 0.2", r"line 2: x2 .* <= x1"),
    ],
)
def test_a_bad_label_line_names_its_file_and_line(yolo_dir: Path, line: str, expected: str, capsys) -> None:
    _labels(yolo_dir / "labels" / "train" / "a.txt", f"0 0.5 0.5 0.5 0.5\n{line}\n")
    with pytest.raises(DatasetError, match=expected) as info:
        YoloDetection(yolo_dir / "data.yaml", "train")
    assert str(yolo_dir / "labels" / "train" / "a.txt") in str(info.value)
    # with skip_bad the line alone is lost, said in one line
    ds = YoloDetection(yolo_dir / "data.yaml", "train", skip_bad=True)
    assert ds.records[0].boxes.shape == (1, 4) and len(ds.skipped) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("retinanet: skipped a box: ") and "a.txt" in err


def test_missing_labels_folder_and_unreadable_images_are_said(yolo_dir: Path, capsys) -> None:
    for txt in (yolo_dir / "labels" / "val").iterdir():
        txt.unlink()
    with pytest.raises(DatasetError, match=r"none of the 1 images has a label file .*labels/val/v\.txt"):
        YoloDetection(yolo_dir / "data.yaml", "val")
    (yolo_dir / "images" / "train" / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"train image 1 \('b\.jpg'\): cannot read image"):
        YoloDetection(yolo_dir / "data.yaml", "train")
    ds = YoloDetection(yolo_dir / "data.yaml", "train", skip_bad=True)
    assert [r.path.name for r in ds.records] == ["a.png", "c.png"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped an image" in err and "b.jpg" in err  # one line, once


def test_data_config_format_yolo_builds_both_splits(yolo_dir: Path) -> None:
    model = ModelConfig(min_size=32, max_size=64)
    data = DataConfig(format="yolo", root=str(yolo_dir / "data.yaml"))
    train = build_dataset(data, model, "train", train_mode=True)
    val = val_dataset(data, model, train.categories)
    assert len(train) == 3 and val is not None and len(val) == 1 and val.categories == train.categories
    # val_images in place of the yaml's entry (an extra validation set), and a yaml without val: no validation
    other = DataConfig(format="yolo", root=str(yolo_dir / "data.yaml"), val_images="images/train/sub")
    assert [r.path.name for r in val_dataset(other, model, train.categories).records] == ["c.png"]
    (yolo_dir / "noval.yaml").write_text("train: images/train\nnames: [tree, car]\n")
    assert val_dataset(DataConfig(format="yolo", root=str(yolo_dir / "noval.yaml")), model, train.categories) is None
    with pytest.raises(ValueError, match=r"format 'yolo' needs train root"):
        build_dataset(DataConfig(format="yolo"), model, "train", train_mode=True)


def test_train_on_yolo_labels_then_detect_writes_yolo_txt(yolo_dir: Path, tmp_path: Path) -> None:
    from conftest import tiny_run

    from retinanet.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run(
                    run,
                    "data.format=yolo",
                    f"data.root={yolo_dir / 'data.yaml'}",
                    "model.min_size=32",
                    "model.max_size=64",
                    "train.max_iters=2",
                    "train.batch_size=2",
                    "model.score_thresh=0.0",
                ),
            ]
        )
        == 0
    )
    out = tmp_path / "detect"
    assert (
        main(
            [
                "detect",
                str(yolo_dir / "images" / "val"),
                "--checkpoint",
                str(run / "last.pt"),
                "--output",
                str(out),
                "--yolo-txt",
                "--score-thresh",
                "0.0",
            ]
        )
        == 0
    )
    records = json.loads((out / "detections.json").read_text())
    lines = (out / "labels" / "v.txt").read_text().splitlines()
    assert len(lines) == len(records[0]["detections"]) > 0
    for line, d in zip(lines, records[0]["detections"]):
        label, cx, cy, w, h, score = line.split()
        x1, y1, x2, y2 = d["box"]
        assert int(label) == d["label"] and float(score) == pytest.approx(d["score"], abs=1e-6)
        assert float(cx) == pytest.approx((x1 + x2) / 2 / 40, abs=1e-6) and float(h) == pytest.approx(
            (y2 - y1) / 20, abs=1e-6
        )
