import json
from pathlib import Path

import pytest
from PIL import Image

from retinanet import build_model
from retinanet.commands.evaluate import run_eval
from retinanet.config import DataConfig
from retinanet.model.checkpoint import save_checkpoint


@pytest.fixture
def trained_on_ant_cat_dog(tmp_path: Path) -> Path:
    # a checkpoint of a model whose labels 0, 1, 2 are ant, cat, dog (the training csv's sorted names)
    model = build_model(
        "retinanet_tiny",
        num_classes=3,
        class_names=("ant", "cat", "dog"),
        category_ids=(1, 2, 3),
        min_size=64,
        max_size=64,
    )
    return save_checkpoint(tmp_path / "model.pt", model)


def _csv_data(folder: Path, lines: str) -> DataConfig:
    (folder / "img").mkdir(exist_ok=True)
    Image.new("RGB", (64, 48)).save(folder / "img" / "a.png")
    (folder / "val.csv").write_text(lines)
    return DataConfig(format="csv", val_annotations=str(folder / "val.csv"))


def test_eval_of_a_csv_without_classes_file_uses_the_models_label_map(tmp_path, trained_on_ant_cat_dog):
    # alone, this csv would make "dog" class 1 of 1; evaluated with the model it must be the model's dog (id 3)
    data = _csv_data(tmp_path, "img/a.png,4,4,30,30,dog\n")
    metrics = run_eval(trained_on_ant_cat_dog, data, tmp_path / "eval")
    assert {"AP", "AP50", "AP75", "dAP50_loc"} <= set(metrics)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(saved["per_class_ap"]) == ["ant", "cat", "dog"]


def test_eval_names_an_unknown_class_of_a_csv(tmp_path, trained_on_ant_cat_dog):
    data = _csv_data(tmp_path, "img/a.png,4,4,30,30,zebra\n")
    with pytest.raises(Exception, match=r"val.csv: line 1: unknown class 'zebra'"):
        run_eval(trained_on_ant_cat_dog, data, tmp_path / "eval")


def test_a_full_disk_keeps_the_earlier_metrics_and_says_so_in_one_line(tmp_path, trained_on_ant_cat_dog, monkeypatch):
    import errno

    from retinanet.runtime import outputs

    data = _csv_data(tmp_path, "img/a.png,4,4,30,30,dog\n")
    run_eval(trained_on_ant_cat_dog, data, tmp_path / "eval")
    before = (tmp_path / "eval" / "metrics.json").read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", no_space)
    with pytest.raises(outputs.WriteError, match=r"cannot write .*\.json \(No space left on device\); [\d.]+ GB free"):
        run_eval(trained_on_ant_cat_dog, data, tmp_path / "eval")
    assert (tmp_path / "eval" / "metrics.json").read_bytes() == before
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.endswith(".tmp")]
