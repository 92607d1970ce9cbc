"""The README's configs and examples/ run as written: every YAML block of the README loads, and the small-images
example trains from the folder a user runs it in."""

import re
from pathlib import Path

import pytest
import yaml

from retinanet.cli import main
from retinanet.config import load_run_config
from retinanet.data import SyntheticShapes

ROOT = Path(__file__).resolve().parents[1]


def _readme_yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_run_configs():
    assert len(_readme_yaml_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_readme_yaml_blocks())))
def test_every_config_in_the_readme_loads(tmp_path, index):
    path = tmp_path / "run.yaml"
    path.write_text(_readme_yaml_blocks()[index])
    cfg = load_run_config(path)
    assert cfg.model.num_classes >= 1  # every key valid, every value of its type


def _write_csv_dataset(folder: Path, split: str, n: int, classes: set[str] | None = None) -> set[str]:
    """n synthetic 400 px images and their boxes as a keras-retinanet CSV (only `classes`, when given); returns the
    classes written."""
    shapes = SyntheticShapes(split, num_images=n, image_size=(400, 400), seed=3)
    rows = []
    for i, record in enumerate(shapes.records):
        name = f"{split}_{i}.png"
        shapes.load_image(i).save(folder / name)
        names = shapes.category_names
        rows += [
            f"{name},{','.join(str(round(v)) for v in box.tolist())},{names[int(label)]}"
            for box, label in zip(record.boxes, record.labels)
            if classes is None or names[int(label)] in classes
        ]
    (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return {row.rsplit(",", 1)[1] for row in rows}


@pytest.mark.slow
def test_the_small_images_example_runs_as_written(tmp_path, monkeypatch):
    example = ROOT / "examples" / "small_objects.yaml"
    written = yaml.safe_load(example.read_text())
    assert written["data"]["train_annotations"] == "my_images/train.csv"
    (tmp_path / "my_images").mkdir()
    classes = _write_csv_dataset(tmp_path / "my_images", "train", 4)
    _write_csv_dataset(tmp_path / "my_images", "val", 2, classes)
    monkeypatch.chdir(tmp_path)  # the user's folder, which holds my_images/
    # the recipe trains for train.minutes; the test for 2 iterations
    assert written["train"]["minutes"] > 0
    assert (
        main(
            [
                "train",
                "--config",
                str(example),
                "--set",
                "train.minutes=null",
                "train.max_iters=2",
                "train.num_workers=0",
            ]
        )
        == 0
    )
    run = tmp_path / written["train"]["output_dir"]
    assert (run / "last.pt").exists() and (run / "eval" / "metrics.json").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["min_size"] == written["model"]["min_size"] == 400
    assert saved["train"]["optimizer"] == "adamw" and saved["train"]["lr_schedule"] == "cosine"
