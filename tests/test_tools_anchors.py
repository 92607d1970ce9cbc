"""Anchor coverage against hand-worked boxes and against the matcher on every anchor; the fit; the report; what
training logs."""

import json
from types import SimpleNamespace

import pytest
import torch
import torchvision
import yaml
from conftest import tiny_run

from retinanet.cli import main
from retinanet.config import load_run_config, model_config
from retinanet.model.detector import build_from_config
from retinanet.ops.anchors import anchor_generator, grid_sizes
from retinanet.ops.matching import anchor_counts, match_anchors
from retinanet.tools.anchor_coverage import (
    LOW_QUALITY,
    NONE,
    POSITIVE,
    box_status,
    coverage,
    coverage_lines,
    training_boxes,
)
from retinanet.tools.anchor_report import write_report
from retinanet.weights.torchvision import torchvision_config

# one square anchor per location, 16 px at P3 (stride 8, centres 4, 12, 20, ...), 32 px at P4 (centres 8, 24, ...)
HAND = dict(
    anchor_sizes=(16, 32, 64, 128, 256),
    anchor_scales=(1.0,),
    aspect_ratios=(1.0,),
    anchor_offset=0.5,
    min_size=64,
    max_size=64,
    fg_iou=0.5,
    bg_iou=0.4,
)
# A: touches the border (x1 = y1 = 0); best anchor P3 [4, 4, 20, 20]: IoU 16*16 / 20*20 = 0.64, positive.
# B: 6 x 6 inside D; its best anchor, P3 [36, 36, 52, 52] (IoU 36 / 256), is D's (IoU 1): B gets none.
# D: exactly the anchor P3 [36, 36, 52, 52]: positive.
# E: 6 x 6 alone; best anchor P3 [4, 36, 20, 52] (IoU 36 / 256), below fg_iou: a low-quality match only.
BOXES = torch.tensor([[0, 0, 20, 20], [40, 40, 46, 46], [36, 36, 52, 52], [8, 40, 14, 46]], dtype=torch.float32)
BEST = torch.tensor([0.64, 36 / 256, 1.0, 36 / 256])
STATUS = torch.tensor([POSITIVE, NONE, POSITIVE, LOW_QUALITY])


def _record(boxes, size=(64, 64), crowd=None):
    crowd = torch.zeros(len(boxes), dtype=torch.bool) if crowd is None else crowd
    return SimpleNamespace(
        boxes=boxes.float(),
        labels=torch.zeros(len(boxes), dtype=torch.int64),
        iscrowd=crowd,
        height=size[0],
        width=size[1],
        path=None,
        image_id=0,
        where="test",
    )


def test_coverage_by_hand_including_a_box_at_the_border():
    cfg = model_config("retinanet_tiny", **HAND)
    found = box_status(cfg, BOXES, (64, 64))
    torch.testing.assert_close(found.best_iou, BEST)
    assert found.status.tolist() == STATUS.tolist()
    assert found.positive.tolist()[0] == 1 and found.positive.tolist()[2] == 1

    cov = coverage(training_boxes([_record(BOXES)], cfg), cfg)
    assert cov.num_boxes == 4 and cov.dropped == 0
    assert cov.shares() == {"boxes": 4, "coverage": 0.5, "low_quality_only": 0.25, "no_anchor": 0.25}
    # the same boxes in an image twice as large: the training resize halves them, coverage is the same
    cov = coverage(training_boxes([_record(BOXES * 2, (128, 128))], cfg), cfg)
    assert cov.status.tolist() == STATUS.tolist()
    torch.testing.assert_close(cov.best_iou, BEST)


def test_the_training_loss_counts_the_same_boxes_without_a_positive_anchor():
    cfg = model_config("retinanet_tiny", **HAND, num_classes=2)
    model = build_from_config(cfg)
    image = torch.rand(3, 64, 64)
    target = {"boxes": BOXES, "labels": torch.zeros(4, dtype=torch.int64)}
    model.loss([image, image], [target, target], resize=False)
    assert int(model.boxes_without_positive) == 2 * 2  # B and E in each image
    crowd = {**target, "iscrowd": torch.tensor([False, False, False, True])}  # E a crowd region: not counted
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    model.loss([image, image], [crowd, empty], resize=False)
    assert int(model.boxes_without_positive) == 1


def test_resize_drops_boxes_under_one_pixel_and_skips_crowds():
    cfg = model_config("retinanet_tiny", **HAND)
    boxes = torch.tensor([[0, 0, 40, 40], [10, 10, 11.5, 30], [50, 50, 120, 120]])
    record = _record(boxes, (128, 128), crowd=torch.tensor([False, False, True]))
    box_set = training_boxes([record], cfg)  # halved: the second box becomes 0.75 px wide
    assert box_set.dropped == 1 and box_set.crowd == 1 and box_set.num_boxes == 1
    torch.testing.assert_close(box_set.boxes_per_entry[0], torch.tensor([[0.0, 0.0, 20.0, 20.0]]))
    assert box_set.padded_sizes == [(64, 64)]
    # multi-scale training: every size of every image, or (training's start line) image i at size i mod sizes
    multi = model_config("retinanet_tiny", **{**HAND, "train_min_sizes": (64, 96), "max_size": 96})
    records = [_record(boxes[:1], (128, 128))] * 3
    assert training_boxes(records, multi).padded_sizes == [(64, 64), (96, 96)] * 3
    assert training_boxes(records, multi, one_size_each=True).padded_sizes == [(64, 64), (96, 96), (64, 64)]


def _random_boxes(g, n, width, height):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
    wh = torch.exp(torch.rand(n, 2, generator=g) * 5) + 1
    boxes = torch.cat([xy, xy + wh], 1)
    boxes = torch.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2].clamp(max=width), boxes[:, 3].clamp(max=height)], 1)
    return boxes[((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)]


@pytest.mark.parametrize("style", ["paper", "torchvision"])
def test_box_status_equals_the_matcher_on_every_anchor(style):
    """The anchors box_status keeps are enough: the same counts as the matcher on all anchors, and the closed-form
    best IoU is the best IoU over all anchors (strides from the image and rounded anchors in torchvision's style)."""
    if style == "paper":
        cfg = model_config("retinanet_r50_fpn", min_size=200, max_size=333)
    else:
        cfg = torchvision_config("v1", 3, min_size=200, max_size=333)
    generator = anchor_generator(cfg)
    g = torch.Generator().manual_seed(0)
    padded = (224, 352)
    grids = grid_sizes(padded)
    anchors = generator(grids, padded)
    for _ in range(15):
        boxes = _random_boxes(g, int(torch.randint(1, 12, (), generator=g)), 333.0, 200.0)
        boxes = torch.cat([boxes, boxes[:1] + 0.5])  # a near-duplicate competes for the same anchors
        found = box_status(cfg, boxes, padded, generator)
        matches = match_anchors(anchors, boxes, cfg.fg_iou, cfg.bg_iou, cfg.allow_low_quality_matches)
        positive, assigned = anchor_counts(matches, anchors, boxes, cfg.fg_iou)
        assert torch.equal(found.positive, positive) and torch.equal(found.assigned, assigned)
        best = torchvision.ops.box_iou(boxes.double(), anchors.double()).max(1).values
        torch.testing.assert_close(found.best_iou.double(), best, atol=1e-6, rtol=0)


def test_grid_sizes_are_the_models():
    cfg = model_config("retinanet_tiny", min_size=64, max_size=128)
    model = build_from_config(cfg).eval()
    for padded in [(64, 96), (96, 64), (128, 128), (64, 160)]:
        with torch.no_grad():
            assert model(torch.zeros(1, 3, *padded)).grid_sizes == grid_sizes(padded)


def _tiny_and_elongated(n_images=40, seed=0):
    """128 px images with 10 px squares and 56 x 8 / 8 x 56 bars at random places."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(n_images):
        rows = []
        for w, h in [(10, 10), (56, 8), (8, 56), (10, 10)]:
            x, y = (torch.rand(2, generator=g) * torch.tensor([128 - w, 128 - h])).tolist()
            rows.append([x, y, x + w, y + h])
        records.append(_record(torch.tensor(rows), (128, 128)))
    return records


@pytest.mark.slow
def test_fit_raises_coverage_of_tiny_and_elongated_boxes(tmp_path):
    cfg = model_config("retinanet_tiny", min_size=128, max_size=128, num_classes=1)
    summary = write_report(_tiny_and_elongated(), cfg, tmp_path, fit=True)
    assert summary["coverage"] < 0.4 and summary["fitted_coverage"] > summary["coverage"] + 0.3
    ratios = summary["overrides"]["aspect_ratios"]
    assert min(ratios) < 0.35 and max(ratios) > 3  # the bars' shapes (h / w = 1/7 and 7) got anchors
    assert len(summary["overrides"]["anchor_scales"]) * len(ratios) <= 9
    for name in ("anchors.json", "anchors.png", "anchors_fit.yaml"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "anchors.json").read_text())["fitted_coverage"] == summary["fitted_coverage"]
    # the YAML, pasted into a config, gives exactly the fitted coverage
    run = tmp_path / "run.yaml"
    overrides = yaml.safe_load((tmp_path / "anchors_fit.yaml").read_text())["model"]
    run.write_text(
        yaml.safe_dump({"model": {"preset": "retinanet_tiny", "min_size": 128, "max_size": 128, **overrides}})
    )
    fitted = load_run_config(run).model
    again = coverage(training_boxes(_tiny_and_elongated(), fitted), fitted)
    assert again.value == summary["fitted_coverage"]


def test_report_without_fit_and_its_buckets(tmp_path):
    cfg = model_config("retinanet_tiny", **HAND)
    summary = write_report([_record(BOXES), _record(torch.zeros(0, 4))], cfg, tmp_path)
    assert summary["coverage"] == 0.5 and summary["boxes"] == 4 and summary["images"] == 2
    assert "fitted_coverage" not in summary and not (tmp_path / "anchors_fit.yaml").exists()
    by_size = {row["bucket"]: row for row in summary["by_size"]}
    assert by_size["< 8 px"]["boxes"] == 2 and by_size["< 8 px"]["coverage"] == 0.0  # B and E
    assert by_size["16-32 px"]["coverage"] == 1.0
    assert summary["anchors"]["anchors_per_location"] == 1
    assert (tmp_path / "anchors.png").is_file()
    with pytest.raises(ValueError, match="no boxes"):
        write_report([_record(torch.zeros(0, 4))], cfg, tmp_path / "none", fit=True)


def test_coverage_lines_warn_below_95_percent():
    cfg = model_config("retinanet_tiny", **HAND)
    cov = coverage(training_boxes([_record(BOXES)], cfg), cfg)
    lines = coverage_lines(cov)
    assert lines[0].startswith("anchors: 50.0% of the 4 training boxes have an anchor at IoU >= 0.5")
    assert "warning" in lines[1] and "retinanet anchors" in lines[1] and "--fit" in lines[1]
    good = coverage(training_boxes([_record(BOXES[:1])], cfg), cfg)
    assert len(coverage_lines(good)) == 1


# 3 x 3 boxes centred 2 px off the P3 and P5 grid points and far from P4's: no anchor shape could reach IoU 0.5 at
# this size (the same-size anchor on the nearest point overlaps 1 x 1 px), so fitting anchors cannot help them
TINY = torch.tensor([[16.5, 16.5, 19.5, 19.5], [16.5, 48.5, 19.5, 51.5]])


def test_boxes_too_small_for_the_grid_are_told_to_grow_the_image_not_to_fit_anchors():
    cfg = model_config("retinanet_tiny", **HAND)
    cov = coverage(training_boxes([_record(TINY), _record(BOXES[:1])], cfg), cfg)
    assert cov.reachable.tolist() == [False, False, True]
    warning = coverage_lines(cov)[1]
    assert "too small for any anchor on the grid at this image size" in warning and "model.min_size" in warning
    assert "proposes a size" in warning


def test_fit_proposes_a_larger_image_size_where_anchors_alone_cannot_cover(tmp_path):
    cfg = model_config("retinanet_tiny", **HAND)
    summary = write_report([_record(TINY), _record(BOXES[:1])], cfg, tmp_path, fit=True)
    larger = summary["larger_size"]
    assert larger["coverage"] > summary["fitted_coverage"] and larger["factor"] > 1
    assert larger["overrides"]["min_size"] == 32 * round(64 * larger["factor"] / 32)
    text = (tmp_path / "anchors_fit.yaml").read_text()
    assert yaml.safe_load(text)["model"] == summary["overrides"]  # the proposal stays a comment
    assert "# objects too small for the anchor grid at this size" in text and "#   min_size:" in text


@pytest.mark.slow
def test_training_logs_the_coverage_and_boxes_without_a_positive_anchor(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_run(out, "data.synthetic_min_object_size=3", "train.max_iters=2")]) == 0
    printed = capsys.readouterr().out
    log = (out / "train.log").read_text()
    assert "training boxes have an anchor at IoU >= 0.5" in printed and "training boxes have an anchor" in log
    assert "retinanet anchors" in log  # the tiny objects: below 95%, the warning names the tool
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    counts = [r["boxes_without_positive"] for r in rows if "lr" in r]
    assert len(counts) == 2 and all(isinstance(c, int) and c >= 0 for c in counts) and sum(counts) > 0


def test_anchors_command(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "retinanet_tiny", "min_size": 64, "max_size": 64},
                "data": {"synthetic_train_images": 5, "synthetic_image_size": 64},
            }
        )
    )
    assert main(["anchors", "--config", str(cfg), "--output", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "anchors.json").read_text())
    assert 0 <= summary["coverage"] <= 1 and summary["boxes"] > 0
    assert f"{100 * summary['coverage']:.1f}% of {summary['boxes']} boxes" in capsys.readouterr().out
    assert main(["anchors", "--config", str(cfg), "--set", "model.init_classes=bad"]) == 2
