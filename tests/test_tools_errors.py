"""TIDE's error decomposition: every error type on hand-made cases, the oracle dAP worked by hand, and the same
counts and dAP as the `tidecv` package on one shared set of detections."""

import json

import pytest
import torch

from retinanet.evaluation.errors import ERROR_TYPES, analyze_errors


def _gt(boxes, labels, crowd=None):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels),
        "iscrowd": torch.tensor(crowd or [False] * len(labels)),
    }


def _det(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels),
    }


def test_every_error_type_on_a_hand_made_image():
    gt = _gt([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [0, 40, 10, 50]], [0, 0, 1, 0, 0])
    det = _det(
        [
            [0, 0, 10, 10],  # tp: box 0
            [0, 0, 10, 10.5],  # dupe: box 0 is taken, IoU 0.95
            [25, 0, 35, 10],  # loc: box 1 shifted by half its width, IoU 1/3: in [0.1, 0.5]
            [40, 0, 50, 10],  # cls: class 0 on the class-1 box 2, IoU 1
            [66, 0, 76, 10],  # both: class 1 near the class-0 box 3 (IoU 0.25)
            [80, 80, 90, 90],
        ],  # bkg: nothing there
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
        [0, 0, 0, 0, 1, 0],
    )
    result = analyze_errors([gt], [det])
    assert result.detections[0] == ["tp", "dupe", "loc", "cls", "both", "bkg"]
    assert result.counts == {"cls": 1, "loc": 1, "both": 1, "dupe": 1, "bkg": 1, "missed": 2}
    # box 4 (far) and box 3 (only a both error near it) are missed; box 1 and box 2 can be fixed by loc and cls
    assert result.ground_truth[0] == ["matched", "fixable", "fixable", "missed", "missed"]


def test_crowd_regions_are_neither_matched_nor_counted():
    gt = _gt([[0, 0, 10, 10], [50, 50, 90, 90]], [0, 0], crowd=[False, True])
    det = _det([[0, 0, 10, 10], [60, 60, 70, 70]], [0.9, 0.8], [0, 0])
    result = analyze_errors([gt], [det])
    assert result.detections[0] == ["tp", "ignored"] and result.counts["bkg"] == 0
    assert result.ground_truth[0] == ["matched", "crowd"] and result.ap["50"] == pytest.approx(1.0)


def test_the_oracle_dap_worked_by_hand():
    # one box; a background detection scores above the true one: precision 1/2 at recall 1 -> AP 0.5
    gt = _gt([[0, 0, 10, 10]], [0])
    det = _det([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])
    result = analyze_errors([gt], [det])
    assert result.ap["50"] == pytest.approx(0.5) and result.dap["bkg"]["50"] == pytest.approx(0.5)
    assert all(result.dap[k]["50"] == 0 for k in ERROR_TYPES if k != "bkg")
    # two boxes, one found: recall stops at 1/2 -> AP 0.5 (51 of 101 recall points); fixing the miss gives 1
    result = analyze_errors([_gt([[0, 0, 10, 10], [30, 30, 40, 40]], [0, 0])], [_det([[0, 0, 10, 10]], [0.9], [0])])
    assert result.counts["missed"] == 1 and result.ap["50"] == pytest.approx(51 / 101)
    assert result.dap["missed"]["50"] == pytest.approx(1 - 51 / 101)
    assert set(result.per_size) == {"small", "medium", "large"} and 0 in result.per_class


def _shared_set(seed=0, images=30, classes=3):
    """Ground truth and noisy detections (moved boxes, wrong classes, duplicates, background, misses)."""
    g = torch.Generator().manual_seed(seed)
    gts, dets = [], []
    for _ in range(images):
        n = int(torch.randint(1, 8, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * 300
        wh = 10 + torch.rand(n, 2, generator=g) * 120
        boxes = torch.cat([xy, xy + wh], 1).round()
        labels = torch.randint(0, classes, (n,), generator=g)
        keep = torch.rand(n, generator=g) > 0.2  # some missed
        jitter = (torch.rand(n, 4, generator=g) - 0.5) * wh.repeat(1, 2) * torch.rand(n, 1, generator=g)
        found = (boxes + jitter)[keep]
        found_labels = torch.where(torch.rand(n, generator=g) < 0.15, (labels + 1) % classes, labels)[keep]
        dupes = found[: max(1, len(found) // 3)] + 2
        noise_xy = torch.rand(3, 2, generator=g) * 300
        noise = torch.cat([noise_xy, noise_xy + 20 + torch.rand(3, 2, generator=g) * 60], 1)
        all_boxes = torch.cat([found, dupes, noise]).round()
        all_labels = torch.cat([found_labels, found_labels[: len(dupes)], torch.randint(0, classes, (3,), generator=g)])
        scores = (torch.rand(len(all_boxes), generator=g) * 0.9 + 0.05).round(decimals=3)
        gts.append({"boxes": boxes, "labels": labels, "iscrowd": torch.zeros(n, dtype=torch.bool)})
        dets.append({"boxes": all_boxes, "scores": scores, "labels": all_labels})
    return gts, dets


def test_same_counts_and_dap_as_tidecv(tmp_path):
    pytest.importorskip("tidecv")
    gts, dets = _shared_set()
    images, annotations, results = [], [], []
    for i, (gt, det) in enumerate(zip(gts, dets), start=1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 500, "height": 500})
        for b, c in zip(gt["boxes"].tolist(), gt["labels"].tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": c + 1,
                    "iscrowd": 0,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "area": (b[2] - b[0]) * (b[3] - b[1]),
                    "segmentation": [[b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]],
                }
            )
        for b, s, c in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append(
                {"image_id": i, "category_id": c + 1, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            )
    categories = [{"id": c, "name": str(c)} for c in (1, 2, 3)]
    (tmp_path / "gt.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    (tmp_path / "dt.json").write_text(json.dumps(results))
    from tidecv import TIDE, datasets

    tide = TIDE()
    run = tide.evaluate(
        datasets.COCO(str(tmp_path / "gt.json")),
        datasets.COCOResult(str(tmp_path / "dt.json")),
        mode=TIDE.BOX,
        name="shared",
    )
    theirs_dap = tide.get_main_errors()["shared"]
    theirs_counts = {e.short_name: len(v) for e, v in run.error_dict.items()}
    ours = analyze_errors(gts, dets)
    names = {"cls": "Cls", "loc": "Loc", "both": "Both", "dupe": "Dupe", "bkg": "Bkg", "missed": "Miss"}
    assert {k: ours.counts[k] for k in names} == {k: theirs_counts[v] for k, v in names.items()}
    assert ours.ap["50"] * 100 == pytest.approx(run.ap, abs=0.5)
    for k, v in names.items():
        assert ours.dap[k]["50"] * 100 == pytest.approx(theirs_dap[v], abs=0.5), k
    assert sum(ours.counts.values()) > 30 and all(ours.counts[k] > 0 for k in names)
