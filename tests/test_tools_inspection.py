"""retinanet inspect: one drawn image per input with boxes coloured by their anchors, and the data's statistics."""

import json
from types import SimpleNamespace

import torch
from conftest import write_run_config
from PIL import Image

from retinanet.cli import main
from retinanet.config import model_config
from retinanet.data import SyntheticShapes
from retinanet.tools.anchor_report import LOW_QUALITY, NONE, POSITIVE
from retinanet.tools.inspection import COLOURS, dataset_statistics, draw_inspection


def _config(tmp_path, **data):
    return write_run_config(
        tmp_path / "run.yaml", data={"synthetic_train_images": 5, "synthetic_val_images": 3, **data}
    )


def test_inspect_writes_one_image_per_input_and_the_statistics(tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", "--config", _config(tmp_path), "--output", str(out), "--limit", "0", "--show-anchors"]) == 0
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == [f"{i:05d}_image{i}.png" for i in range(5)]
    assert Image.open(out / "images" / images[0]).size == (384, 384)  # 64 px drawn six times larger
    stats = json.loads((out / "stats.json").read_text())
    data = SyntheticShapes("train", num_images=5, image_size=(64, 64))
    assert stats["images"] == 5 and stats["boxes"] == sum(len(r.boxes) for r in data.records)
    assert sum(c["boxes"] for c in stats["classes"]) == stats["boxes"]
    assert [c["name"] for c in stats["classes"]] == data.category_names
    report = json.loads((out / "inspect.json").read_text())
    assert sum(report["boxes_by_status"].values()) == stats["boxes"]
    assert (out / "stats.png").is_file()
    assert f"{stats['images']} images" in capsys.readouterr().out
    # again, on the validation split with the training augmentation: the earlier drawings are replaced, and the
    # images are those the training transforms make (multi-scale sizes drawn per image), not the evaluation resize
    plain = tmp_path / "plain"
    config = _config(tmp_path)
    multi = ["--set", "model.train_min_sizes=[40, 96]"]
    assert main(["inspect", "--config", config, "--output", str(plain), "--split", "val", *multi]) == 0
    assert main(["inspect", "--config", config, "--output", str(out), "--split", "val", "--augment", *multi]) == 0
    assert len(list((out / "images").iterdir())) == 3
    sizes = [tuple(row["size"]) for row in json.loads((out / "inspect.json").read_text())["images"]]
    assert [tuple(row["size"]) for row in json.loads((plain / "inspect.json").read_text())["images"]] == [(64, 64)] * 3
    # the shorter side drawn from train_min_sizes as training does (96 capped at max_size 64)
    assert set(sizes) <= {(40, 40), (64, 64)} and (40, 40) in sizes


def test_only_missed_draws_the_images_with_a_box_without_a_positive_anchor(tmp_path):
    out = tmp_path / "missed"
    config = _config(tmp_path, synthetic_min_object_size=3, synthetic_train_images=8)
    assert main(["inspect", "--config", config, "--output", str(out), "--only-missed"]) == 0
    report = json.loads((out / "inspect.json").read_text())
    assert report["images"] and all(row["positive"] < row["boxes"] for row in report["images"])
    assert len(list((out / "images").iterdir())) == len(report["images"]) < 8


def test_boxes_are_drawn_in_their_status_colour():
    image = torch.zeros(3, 64, 64)
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0], [34.0, 4.0, 60.0, 30.0], [4.0, 34.0, 30.0, 60.0]])
    status = torch.tensor([POSITIVE, LOW_QUALITY, NONE])
    drawn = draw_inspection(image, boxes, status, torch.zeros(3, dtype=torch.int64), ["thing"], torch.ones(3))
    assert drawn.shape == (3, 384, 384)
    for (x1, y1, x2, y2), s in zip((boxes * 6).long().tolist(), status.tolist()):
        colour = [int(COLOURS[s][i : i + 2], 16) for i in (1, 3, 5)]
        assert drawn[:, y2, (x1 + x2) // 2].tolist() == colour  # the bottom edge, below the label


def test_statistics_of_hand_made_records():
    records = [
        SimpleNamespace(
            boxes=torch.tensor([[0.0, 0, 10, 20], [5, 5, 45, 15]]),
            labels=torch.tensor([0, 1]),
            iscrowd=torch.tensor([False, False]),
            width=100,
            height=50,
            path=None,
        ),
        SimpleNamespace(
            boxes=torch.zeros(0, 4),
            labels=torch.zeros(0, dtype=torch.int64),
            iscrowd=torch.zeros(0, dtype=torch.bool),
            width=100,
            height=50,
            path=None,
        ),
        SimpleNamespace(
            boxes=torch.tensor([[0.0, 0, 30, 30], [1, 1, 2, 2]]),
            labels=torch.tensor([1, 0]),
            iscrowd=torch.tensor([False, True]),
            width=100,
            height=50,
            path=None,
        ),
    ]
    categories = [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}]
    stats = dataset_statistics(records, categories, model_config("retinanet_tiny", min_size=100, max_size=200))
    assert (stats["images"], stats["empty_images"], stats["boxes"], stats["crowd_regions"]) == (3, 1, 3, 1)
    assert stats["classes"] == [
        {"label": 0, "id": 3, "name": "a", "boxes": 1, "images": 1},
        {"label": 1, "id": 8, "name": "b", "boxes": 2, "images": 2},
    ]
    assert stats["boxes_per_image"]["max"] == 2 and stats["boxes_per_image"]["mean"] == 1.0
    assert stats["box_width_px"]["min"] == 10 and stats["box_height_px"]["max"] == 30
    assert stats["box_size_px_after_resize"]["max"] == 60  # 50 px high -> 100: the 30 px box doubles
