from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinanet.data import CsvDetection, DatasetError


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 16)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (10, 12)).save(tmp_path / "img" / "b.jpg")
    (tmp_path / "ann.csv").write_text("img/a.png,1,2,11,9,dog\nimg/a.png,0,0,20,16,cat\n\nimg/b.jpg,,,,,\n")
    (tmp_path / "classes.csv").write_text("dog,0\ncat,1\n")
    return tmp_path


def test_reads_csv_with_classes_file(csv_dir: Path) -> None:
    ds = CsvDetection(csv_dir / "ann.csv", csv_dir / "classes.csv")
    assert ds.categories == [{"id": 0, "name": "dog"}, {"id": 1, "name": "cat"}]
    assert len(ds) == 2
    r = ds.records[0]
    assert r.path == csv_dir / "img" / "a.png" and r.image_id == 0
    assert r.boxes.tolist() == [[1.0, 2.0, 11.0, 9.0], [0.0, 0.0, 20.0, 16.0]] and r.labels.tolist() == [0, 1]
    image, target = ds[0]
    assert image.shape == (3, 16, 20) and target["orig_size"] == (16, 20) and target["boxes"].canvas_size == (16, 20)
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["image_id"] == 1


def test_without_classes_file_names_are_sorted(csv_dir: Path) -> None:
    ds = CsvDetection(csv_dir / "ann.csv")
    assert ds.categories == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert ds.records[0].labels.tolist() == [1, 0]


def test_root_resolves_relative_paths(csv_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("elsewhere")
    (other / "ann.csv").write_text("a.png,1,2,11,9,dog\n")
    ds = CsvDetection(other / "ann.csv", root=csv_dir / "img")
    assert ds[0][0].shape == (3, 16, 20)


@pytest.mark.parametrize(
    "lines, line, expected",
    [
        ("img/a.png,1,2,11,9,dog\nimg/a.png,1,2,11\n", "line 2", "expected 'path,x1,y1,x2,y2,class_name'"),
        ("img/a.png,1,2,x,9,dog\n", "line 1", "expected four numbers"),
        ("img/a.png,1,2,11,9,dog\n\nimg/a.png,12,2,11,9,dog\n", "line 3", "x2 (11.0) <= x1 (12.0)"),
        ("img/a.png,1,9,11,9,dog\n", "line 1", "y2 (9.0) <= y1 (9.0)"),
        ("img/a.png,1,2,11,9,\n", "line 1", "no class name"),
        ("img/a.png,1,2,11,9,dog\nimg/b.jpg,1,2,3,4,bird\n", "line 2", "unknown class 'bird'"),
    ],
)
def test_bad_line_raises_naming_file_and_line(csv_dir: Path, lines: str, line: str, expected: str) -> None:
    (csv_dir / "ann.csv").write_text(lines)
    with pytest.raises(DatasetError) as e:
        CsvDetection(csv_dir / "ann.csv", csv_dir / "classes.csv")
    assert "ann.csv" in str(e.value) and line in str(e.value) and expected in str(e.value)


def test_box_outside_image_raises_when_loaded(csv_dir: Path) -> None:
    (csv_dir / "ann.csv").write_text("img/b.jpg,,,,,\nimg/a.png,1,2,11,9,dog\nimg/a.png,1,2,25,9,dog\n")
    ds = CsvDetection(csv_dir / "ann.csv")
    with pytest.raises(DatasetError) as e:
        ds[1]
    msg = str(e.value)
    assert "ann.csv" in msg and "line 3" in msg and "dataset index 1" in msg and "outside the 20x16 image" in msg


def test_bad_files(csv_dir: Path) -> None:
    (csv_dir / "empty.csv").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty.csv: empty file"):
        CsvDetection(csv_dir / "empty.csv")
    with pytest.raises(DatasetError, match="missing.csv: .*not found"):
        CsvDetection(csv_dir / "missing.csv")
    (csv_dir / "classes.csv").write_text("dog,0\ncat\n")
    with pytest.raises(DatasetError, match="classes.csv: line 2: 'cat'; expected 'class_name,id'"):
        CsvDetection(csv_dir / "ann.csv", csv_dir / "classes.csv")
    (csv_dir / "classes.csv").write_text("dog,0\ncat,0\n")
    with pytest.raises(DatasetError, match="classes.csv: duplicate class ids"):
        CsvDetection(csv_dir / "ann.csv", csv_dir / "classes.csv")


def test_missing_and_truncated_images_raise_in_getitem(csv_dir: Path) -> None:
    ds = CsvDetection(csv_dir / "ann.csv")
    (csv_dir / "img" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"ann.csv: image 0 \('a.png'\) \(dataset index 0\): image file not found"):
        ds[0]
    rng = np.random.default_rng(0)
    path = csv_dir / "img" / "b.jpg"
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DatasetError, match=r"image 1 \('b.jpg'\) \(dataset index 1\): cannot decode"):
        ds[1]


def test_skip_bad_drops_a_bad_box_alone(csv_dir: Path, capsys) -> None:
    (csv_dir / "ann.csv").write_text("img/a.png,1,2,11,9,dog\nimg/b.jpg,5,2,3,9,dog\nimg/b.jpg,1,1,4,4,cat\n")
    ds = CsvDetection(csv_dir / "ann.csv", skip_bad=True)
    assert [r.path.name for r in ds.records] == ["a.png", "b.jpg"]  # b.jpg keeps its good box
    assert [r.box_names for r in ds.records] == [["line 1"], ["line 3"]]
    (skip,) = ds.skipped
    assert skip.box and skip.index == 1 and skip.file.endswith("b.jpg") and "line 2: x2" in skip.reason
    assert capsys.readouterr().err.startswith("retinanet: skipped a box: ")


def test_given_categories_fix_the_label_map(csv_dir: Path) -> None:
    # a validation csv read with the training set's categories: names keep the training labels
    train_categories = [{"id": 1, "name": "ant"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "dog"}]
    ds = CsvDetection(csv_dir / "ann.csv", categories=train_categories)
    assert ds.categories == train_categories
    assert ds.records[0].labels.tolist() == [2, 1]  # dog, cat
    with pytest.raises(DatasetError, match=r"ann.csv: line 1: unknown class 'dog'"):
        CsvDetection(csv_dir / "ann.csv", categories=[{"id": 1, "name": "cat"}])
    with pytest.raises(ValueError, match="not both"):
        CsvDetection(csv_dir / "ann.csv", csv_dir / "classes.csv", categories=train_categories)


def test_validation_set_without_classes_file_takes_the_training_label_map(tmp_path: Path) -> None:
    from retinanet.config import DataConfig, model_config
    from retinanet.data import build_dataset, val_dataset

    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 16)).save(tmp_path / "img" / "a.png")
    (tmp_path / "train.csv").write_text("img/a.png,1,2,11,9,ant\nimg/a.png,0,0,20,16,cat\nimg/a.png,2,2,9,9,dog\n")
    (tmp_path / "val.csv").write_text("img/a.png,1,2,11,9,dog\n")  # alone it would be class 1 of 1
    data = DataConfig(
        format="csv", train_annotations=str(tmp_path / "train.csv"), val_annotations=str(tmp_path / "val.csv")
    )
    model = model_config("retinanet_tiny", min_size=64, max_size=64)
    train = build_dataset(data, model, "train", train_mode=True)
    val = val_dataset(data, model, train.categories)
    assert val.categories == train.categories and val.records[0].labels.tolist() == [2]


def test_a_problem_met_twice_is_said_once(tmp_path: Path, capsys) -> None:
    # the same annotations read for training and validation: each skipped box is said once, and kept by both
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 16)).save(tmp_path / "img" / "a.png")
    (tmp_path / "ann.csv").write_text("img/a.png,1,2,11,9,dog\nimg/a.png,5,5,2,2,dog\n")
    first = CsvDetection(tmp_path / "ann.csv", skip_bad=True)
    second = CsvDetection(tmp_path / "ann.csv", skip_bad=True)
    assert len(first.skipped) == len(second.skipped) == 1
    assert capsys.readouterr().err.count("skipped a box") == 1
