import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet.evaluation import (
    CocoMetrics,
    average_precision,
    coco_ground_truth,
    coco_results,
    evaluate_coco,
    evaluate_voc,
    plot_pr_curves,
    save_coco_results,
)

# Original ids deliberately out of order, so that contiguous label order != pycocotools' sorted-id order.
CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "bird"}]
IMAGE_IDS = [10, 11, 12, 13, 14, 15]


def _xyxy(rows_xywh: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(rows_xywh, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1)


def _random_scene(seed: int = 0):
    """Integer xywh boxes (exact in float32), as (gts, detections, gt_json, results_json) built independently."""
    g = np.random.default_rng(seed)
    gts, dets, images, anns, results = [], [], [], [], []
    for i, image_id in enumerate(IMAGE_IDS):
        n = 0 if i == 0 else int(g.integers(1, 6))  # image 10 has no ground truth at all
        xywh = [
            [int(g.integers(0, 300)), int(g.integers(0, 300)), int(g.integers(4, 150)), int(g.integers(4, 150))]
            for _ in range(n)
        ]
        labels = g.integers(0, 3, n).tolist()
        crowd = [bool(c) for c in (g.random(n) < 0.2)]
        gts.append(
            {
                "image_id": image_id,
                "boxes": _xyxy(xywh),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "iscrowd": torch.tensor(crowd, dtype=torch.bool),
                "width": 500,
                "height": 480,
            }
        )
        images.append({"id": image_id, "width": 500, "height": 480})
        for b, lab, c in zip(xywh, labels, crowd):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORIES[lab]["id"],
                    "bbox": [float(v) for v in b],
                    "area": float(b[2] * b[3]),
                    "iscrowd": int(c),
                }
            )
        if i == 2:  # image 12 has ground truth but no detections
            continue
        det_xywh = [
            [
                x + int(g.integers(-6, 7)),
                y + int(g.integers(-6, 7)),
                w + int(g.integers(-5, 6)),
                h + int(g.integers(-5, 6)),
            ]
            for x, y, w, h in xywh
        ]
        det_xywh += [
            [int(g.integers(0, 300)), int(g.integers(0, 300)), int(g.integers(4, 150)), int(g.integers(4, 150))]
            for _ in range(int(g.integers(0, 4)))
        ]
        det_labels = [lab if g.random() < 0.8 else int(g.integers(0, 3)) for lab in labels]
        det_labels += g.integers(0, 3, len(det_xywh) - len(labels)).tolist()
        scores = torch.rand(len(det_xywh), generator=torch.Generator().manual_seed(seed * 100 + i))
        dets.append(
            {
                "image_id": image_id,
                "boxes": _xyxy(det_xywh),
                "scores": scores,
                "labels": torch.tensor(det_labels, dtype=torch.int64),
            }
        )
        for b, lab, s in zip(det_xywh, det_labels, scores.tolist()):
            results.append(
                {"image_id": image_id, "category_id": CATEGORIES[lab]["id"], "bbox": [float(v) for v in b], "score": s}
            )
    gt_json = {"images": images, "annotations": anns, "categories": CATEGORIES}
    return gts, dets, gt_json, results


def _pycocotools_direct(tmp_path, gt_json, results):
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "res.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "res.json")), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_matches_pycocotools_exactly(tmp_path, seed):
    gts, dets, gt_json, results = _random_scene(seed)
    reference = _pycocotools_direct(tmp_path, gt_json, results)
    metrics = evaluate_coco(gts, dets, CATEGORIES)
    expected = [math.nan if s == -1 else s for s in reference.stats]
    np.testing.assert_array_equal(np.array(metrics.stats), np.array(expected))
    np.testing.assert_array_equal(metrics.precision, reference.eval["precision"])
    assert 0 < metrics.AP < 1


def test_per_class_ap_is_pycocotools_mean_precision_of_that_class(tmp_path):
    gts, dets, gt_json, results = _random_scene(3)
    reference = _pycocotools_direct(tmp_path, gt_json, results)
    metrics = evaluate_coco(gts, dets, CATEGORIES)
    for category in CATEGORIES:
        k = reference.params.catIds.index(category["id"])
        p = reference.eval["precision"][:, :, k, 0, -1]
        assert metrics.per_class_ap[category["name"]] == np.mean(p[p > -1])
    assert metrics.category_names == ["dog", "bird", "cat"]  # pycocotools' order: sorted original ids


def test_perfect_detections_give_ap_one():
    gts, _, _, _ = _random_scene(4)
    dets = [
        {
            "image_id": gt["image_id"],
            "boxes": gt["boxes"][~gt["iscrowd"]],
            "labels": gt["labels"][~gt["iscrowd"]],
            "scores": torch.ones(int((~gt["iscrowd"]).sum())),
        }
        for gt in gts
    ]
    metrics = evaluate_coco(gts, dets, CATEGORIES)
    # pycocotools divides tp by (tp + fp + eps), so "1" may be 1 - 2e-16
    one = pytest.approx(1.0, abs=1e-12)
    assert [metrics.AP, metrics.AP50, metrics.AP75, metrics.AR100] == [one] * 4
    assert list(metrics.per_class_ap.values()) == [one] * 3


def _one_box_per_size():
    xywh = [[0, 0, 10, 10], [50, 50, 50, 50], [100, 100, 200, 200]]  # small, medium, large
    return [
        {"image_id": 1, "boxes": _xyxy(xywh), "labels": torch.tensor([0, 1, 2]), "width": 400, "height": 400},
        {
            "image_id": 2,
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "width": 400,
            "height": 400,
        },
    ]


@pytest.mark.parametrize("empty", ["no_entries", "empty_tensors"])
def test_zero_detections_give_zero(empty):
    gts = _one_box_per_size()
    dets = (
        []
        if empty == "no_entries"
        else [
            {
                "image_id": gt["image_id"],
                "boxes": torch.zeros(0, 4),
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64),
            }
            for gt in gts
        ]
    )
    metrics = evaluate_coco(gts, dets, CATEGORIES)
    assert metrics.stats == [0.0] * 12
    assert metrics.per_class_ap == {"cat": 0.0, "dog": 0.0, "bird": 0.0}


def test_undefined_values_are_nan_not_minus_one():
    gts = [
        {"image_id": 1, "boxes": _xyxy([[0, 0, 200, 200]]), "labels": torch.tensor([0]), "width": 300, "height": 300}
    ]
    dets = [
        {"image_id": 1, "boxes": _xyxy([[0, 0, 200, 200]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    ]
    metrics = evaluate_coco(gts, dets, CATEGORIES)
    assert metrics.AP == pytest.approx(1.0, abs=1e-12) and metrics.APl == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(metrics.APs) and math.isnan(metrics.APm)  # no small / medium ground truth
    assert math.isnan(metrics.per_class_ap["dog"])
    no_gt = evaluate_coco([{**gts[0], "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], [], CATEGORIES)
    assert all(math.isnan(s) for s in no_gt.stats)


def test_quiet_unless_verbose(capsys):
    gts, dets, _, _ = _random_scene(5)
    evaluate_coco(gts, dets, CATEGORIES)
    assert capsys.readouterr().out == ""
    evaluate_coco(gts, dets, CATEGORIES, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_max_dets_reads_the_matching_column():
    gts, dets, _, _ = _random_scene(6)
    metrics = evaluate_coco(gts, dets, CATEGORIES, max_dets=20)
    p = metrics.precision[:, :, :, 0, 2]
    assert metrics.max_dets_list == [1, 10, 20] and metrics.AP == np.mean(p[p > -1])
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_coco(gts, dets, CATEGORIES, max_dets=5)


def test_to_dict_is_json_ready():
    gts, dets, _, _ = _random_scene(7)
    summary = evaluate_coco(gts, dets, CATEGORIES).to_dict()
    assert list(summary)[:3] == ["AP", "AP50", "AP75"] and set(summary["per_class_ap"]) == {"cat", "dog", "bird"}
    json.dumps(summary)


def test_pr_plot_is_a_png(tmp_path):
    gts, dets, _, _ = _random_scene(8)
    metrics = evaluate_coco(gts, dets, CATEGORIES)
    path = plot_pr_curves(metrics, tmp_path / "plots" / "pr.png", iou=(0.5, 0.75))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="iou"):
        plot_pr_curves(metrics, tmp_path / "bad.png", iou=0.33)


def test_coco_results_round_trip(tmp_path):
    boxes = torch.tensor([[10.5, 20.0, 30.5, 60.0], [0.0, 0.0, 1.0, 2.0]])
    dets = [
        {"image_id": 3, "boxes": boxes, "scores": torch.tensor([0.75, 0.5]), "labels": torch.tensor([0, 1])},
        {"image_id": 4, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)},
    ]
    rows = coco_results(dets, CATEGORIES)
    assert [r["category_id"] for r in rows] == [7, 2] and [r["image_id"] for r in rows] == [3, 3]
    assert rows[0]["bbox"] == [10.5, 20.0, 20.0, 40.0] and rows[0]["score"] == 0.75
    back = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)])
    torch.testing.assert_close(back, boxes, rtol=0, atol=0)
    path = save_coco_results(dets, CATEGORIES, tmp_path / "out" / "res.json")
    assert json.loads(path.read_text()) == rows


def test_coco_ground_truth_fields():
    gt = {
        "image_id": 9,
        "boxes": _xyxy([[1, 2, 3, 4], [5, 6, 7, 8]]),
        "labels": torch.tensor([2, 0]),
        "iscrowd": torch.tensor([False, True]),
        "width": 64,
        "height": 48,
    }
    dataset = coco_ground_truth([gt], CATEGORIES)
    assert dataset["images"] == [{"id": 9, "width": 64, "height": 48}]
    assert [(a["id"], a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in dataset["annotations"]] == [
        (1, 5, [1.0, 2.0, 3.0, 4.0], 12.0, 0),
        (2, 7, [5.0, 6.0, 7.0, 8.0], 56.0, 1),
    ]


def test_bad_inputs_raise_value_error_naming_the_place():
    gts = _one_box_per_size()
    with pytest.raises(ValueError, match=r"gts\[1\]\['boxes'\]"):
        coco_ground_truth([gts[0], {**gts[1], "boxes": torch.zeros(2, 3)}], CATEGORIES)
    with pytest.raises(ValueError, match=r"gts\[0\]\['boxes'\]: box 1"):
        coco_ground_truth([{**gts[0], "boxes": torch.tensor([[0.0, 0, 1, 1], [5, 5, 4, 6], [0, 0, 1, 1]])}], CATEGORIES)
    with pytest.raises(ValueError, match=r"gts\[0\]\['labels'\]"):
        coco_ground_truth([{**gts[0], "labels": torch.tensor([0, 1, 3])}], CATEGORIES)
    with pytest.raises(ValueError, match=r"detections\[0\]: image_id 99"):
        evaluate_coco(
            gts,
            [{"image_id": 99, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}],
            CATEGORIES,
        )
    with pytest.raises(ValueError, match="categories"):
        coco_results([], [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])


# --------------------------------------------------------------------------------------------------------------
# VOC


def _voc_scene(extra_dets=(), extra_gts=(), difficult=()):
    gt_boxes = [[0, 0, 10, 10], [20, 20, 30, 30], *extra_gts]
    gts = [
        {
            "image_id": 1,
            "boxes": torch.tensor(gt_boxes, dtype=torch.float32),
            "labels": torch.zeros(len(gt_boxes), dtype=torch.int64),
            "iscrowd": torch.tensor([False, False, *difficult]),
        }
    ]
    # by score: TP on gt 0, FP far away, TP on gt 1 -> recall .5 .5 1, precision 1 .5 2/3
    det_rows = [(0.9, [0, 0, 10, 10]), (0.8, [50, 50, 60, 60]), (0.7, [21, 21, 31, 31]), *extra_dets]
    dets = [
        {
            "image_id": 1,
            "boxes": torch.tensor([b for _, b in det_rows], dtype=torch.float32),
            "scores": torch.tensor([s for s, _ in det_rows]),
            "labels": torch.zeros(len(det_rows), dtype=torch.int64),
        }
    ]
    return gts, dets


def test_voc_hand_worked_all_point_and_11_point():
    gts, dets = _voc_scene()
    # envelope: precision 1 up to recall .5, 2/3 up to recall 1 -> .5 * 1 + .5 * 2/3
    assert evaluate_voc(gts, dets, num_classes=1)["mAP"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    # 11 points: recall >= 0 .. .5 (6 points) have precision 1, recall >= .6 .. 1 (5 points) have 2/3
    assert evaluate_voc(gts, dets, 1, use_07_metric=True)["mAP"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)


def test_voc_difficult_is_neither_tp_nor_fp():
    # a difficult gt found by a 0.85 detection and one never found: both leave the AP unchanged
    gts, dets = _voc_scene(
        extra_dets=[(0.85, [40, 40, 50, 50])], extra_gts=[[40, 40, 50, 50], [80, 80, 90, 90]], difficult=[True, True]
    )
    assert evaluate_voc(gts, dets, 1)["mAP"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)


def test_voc_duplicate_is_false_positive_and_iou_threshold():
    gts, dets = _voc_scene(extra_dets=[(0.95, [0, 0, 10, 10])])  # TP, then the 0.9 duplicate becomes FP
    # ranking TP FP FP TP: recall .5 .5 .5 1, precision 1 .5 1/3 1/2
    assert evaluate_voc(gts, dets, 1)["mAP"] == pytest.approx(0.5 + 0.5 * 0.5, abs=1e-12)
    gts, dets = _voc_scene()  # the 0.7 detection has IoU 81/119 ~ 0.68 with gt 1
    assert evaluate_voc(gts, dets, 1, iou_threshold=0.7)["mAP"] == pytest.approx(0.5, abs=1e-12)


def test_voc_empty_images_classes_without_gt_and_no_detections():
    gts, dets = _voc_scene()
    gts.append({"image_id": 2, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    result = evaluate_voc(gts, dets, num_classes=3)
    assert math.isnan(result["per_class"][1]) and math.isnan(result["per_class"][2])
    assert result["mAP"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert evaluate_voc(gts, [], num_classes=3)["per_class"][0] == 0.0
    assert math.isnan(evaluate_voc([gts[1]], [], num_classes=3)["mAP"])


def test_average_precision_edges():
    assert average_precision(torch.tensor([1.0]), torch.tensor([1.0])) == 1.0
    assert average_precision(torch.zeros(0), torch.zeros(0)) == 0.0
    assert average_precision(torch.zeros(0), torch.zeros(0), use_07_metric=True) == 0.0


def test_coco_metrics_is_a_dataclass():
    assert CocoMetrics.STAT_NAMES[-1] == "ARl"
