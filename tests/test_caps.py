"""No silent caps: the evaluation's detections per image, the model's cap and the hints follow the data."""

import json
from types import SimpleNamespace

import torch
from conftest import tiny_run
from PIL import Image

from retinanet.cli import main
from retinanet.config import ModelConfig
from retinanet.evaluation import max_dets_for
from retinanet.evaluation.dataset import evaluate_predictions
from retinanet.inference.files import size_hints
from retinanet.train.run import detection_cap


def _dense(n: int) -> tuple[dict, dict]:
    """One image with n objects of 6 px in a grid, and a perfect detection of each."""
    side = int(n**0.5) + 1
    boxes = torch.tensor(
        [[10.0 * (i % side), 10.0 * (i // side), 10.0 * (i % side) + 6, 10.0 * (i // side) + 6] for i in range(n)]
    )
    labels = torch.zeros(n, dtype=torch.long)
    gt = {
        "image_id": 1,
        "boxes": boxes,
        "labels": labels,
        "iscrowd": torch.zeros(n, dtype=torch.bool),
        "width": 10 * side,
        "height": 10 * side,
    }
    det = {"image_id": 1, "boxes": boxes, "scores": torch.linspace(1.0, 0.5, n), "labels": labels}
    return gt, det


def test_the_evaluation_counts_as_many_detections_as_an_image_holds_objects(tmp_path):
    gt, det = _dense(250)
    assert max_dets_for([gt]) == 250 and max_dets_for([_dense(20)[0]]) == 100  # COCO's 100 where it suffices
    metrics = evaluate_predictions([gt], [det], [{"id": 1, "name": "star"}], tmp_path)
    assert metrics.stats[8] == 1.0  # AR at the last max_dets: every object found (at 100 it would be 0.4)
    assert json.loads((tmp_path / "metrics.json").read_text())["max_dets"] == 250


def test_a_dense_training_set_raises_the_default_cap_and_says_so():
    dense = SimpleNamespace(records=[SimpleNamespace(iscrowd=torch.zeros(n, dtype=torch.bool)) for n in (3, 1156)])
    model, line = detection_cap(ModelConfig(), dense)
    assert model.detections_per_image == 1800 and "1156 objects" in line and "raised to 1800" in line
    kept, line = detection_cap(ModelConfig(detections_per_image=300), dense)  # set by the user: kept, and said
    assert kept.detections_per_image == 300 and line.startswith("warning:") and "stop at 300" in line
    sparse = SimpleNamespace(records=[SimpleNamespace(iscrowd=torch.zeros(5, dtype=torch.bool))])
    assert detection_cap(ModelConfig(), sparse) == (ModelConfig(), None)


def test_hints_name_tiles_only_where_tiles_would_help():
    cfg = ModelConfig(min_size=512, max_size=512, detections_per_image=100)
    capped = {"file": "sky.png", "width": 512, "height": 512, "detections": [{}] * 100}
    untiled = SimpleNamespace(config=cfg, tile=None, capped_tiles=0)
    (line,) = size_hints(untiled, [capped])
    assert "reached the model's cap of 100" in line and "--max-detections" in line and "--tile" not in line
    (line,) = size_hints(untiled, [{**capped, "width": 2048, "height": 2048}])[1:]  # shrunk: tiles would help
    assert "--tile 512" in line
    assert size_hints(untiled, [{**capped, "width": 700, "detections": []}]) == []  # 1.37x: not worth a line
    tiled = SimpleNamespace(config=cfg, tile=512, capped_tiles=0)
    assert size_hints(tiled, [{**capped, "detections": [{}] * 1156}]) == []  # 1,156 in tiles: no cap reached
    (line,) = size_hints(SimpleNamespace(config=cfg, tile=512, capped_tiles=3), [capped])
    assert "3 tile(s) reached the model's cap of 100 detections per tile" in line


def test_detect_max_detections_sets_the_cap(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, "train.max_iters=1")]) == 0
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(tmp_path / "imgs" / "a.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "detect",
                str(tmp_path / "imgs"),
                "--checkpoint",
                str(run / "last.pt"),
                "--output",
                str(out),
                "--score-thresh",
                "0.0",
                "--max-detections",
                "7",
            ]
        )
        == 0
    )
    records = json.loads((out / "detections.json").read_text())
    assert len(records[0]["detections"]) == 7  # an untrained model scores every anchor: exactly the cap
    assert "reached the model's cap of 7 detections" in capsys.readouterr().err


def test_tiles_larger_than_the_training_scale_are_said():
    cfg = ModelConfig(min_size=512, max_size=512)
    (line,) = size_hints(SimpleNamespace(config=cfg, tile=1024, capped_tiles=0), [])
    assert "tiles of 1024 px were shrunk 2.0x" in line and "--tile 512" in line
    assert size_hints(SimpleNamespace(config=cfg, tile=640, capped_tiles=0), []) == []  # 1.25x
