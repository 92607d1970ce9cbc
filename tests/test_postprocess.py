import math

import pytest
import torch
from torchvision.ops import box_iou

from retinanet.ops.matching import BoxCoder
from retinanet.ops.postprocess import Detections, postprocess

CODER = BoxCoder()
LOW = -20.0  # a logit whose score is far below any threshold


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# one level of 4 anchors: 0 and 1 overlap (IoU 0.81), 2 is apart, 3 sticks out of a 100 x 80 (h x w) image
ANCHORS = torch.tensor([[10.0, 10, 50, 50], [12, 12, 52, 52], [60, 10, 75, 30], [60, 70, 100, 120]])
SIZE = [(100, 80)]  # (h, w)


def _run(logits, deltas=None, anchors=ANCHORS, sizes=SIZE, **kw) -> list[Detections]:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 2:
        logits = logits[None]
    if deltas is None:
        deltas = torch.zeros(*logits.shape[:2], 4)
    levels = anchors if isinstance(anchors, list) else [anchors]
    return postprocess(logits, deltas, levels, sizes, CODER, **kw)


def _grid(entries: dict[tuple[int, int], float], n: int = 4, k: int = 2) -> torch.Tensor:
    logits = torch.full((n, k), LOW)
    for (anchor, cls), p in entries.items():
        logits[anchor, cls] = _logit(p)
    return logits


def test_score_threshold():
    (det,) = _run(_grid({(0, 0): 0.06, (2, 1): 0.04}), score_thresh=0.05)
    assert det.labels.tolist() == [0]
    assert det.scores.tolist() == pytest.approx([0.06])
    torch.testing.assert_close(det.boxes, ANCHORS[:1])
    (det,) = _run(_grid({(0, 0): 0.06, (2, 1): 0.04}), score_thresh=0.03)
    assert len(det.scores) == 2


def test_deltas_are_decoded_against_their_anchor():
    deltas = torch.zeros(1, 4, 4)
    deltas[0, 2] = torch.tensor([0.1, -0.2, math.log(1.2), 0.0])  # stays inside the image
    (det,) = _run(_grid({(2, 1): 0.9}), deltas)
    torch.testing.assert_close(det.boxes, CODER.decode(deltas[0, 2:3], ANCHORS[2:3]))
    assert det.labels.tolist() == [1]


def test_top_k_is_per_level():
    # two levels of 4 anchors; with top-k 2 each level keeps its own 2 best, even though level 1's are all better
    level0 = ANCHORS
    level1 = ANCHORS + 1.0
    logits = torch.cat(
        [_grid({(0, 0): 0.30, (1, 1): 0.20, (2, 0): 0.10}), _grid({(0, 1): 0.9, (2, 0): 0.8, (3, 1): 0.7})]
    )
    (det,) = _run(logits, anchors=[level0, level1], topk_candidates=2, nms_thresh=1.0)
    assert det.scores.tolist() == pytest.approx([0.9, 0.8, 0.3, 0.2])
    (det,) = _run(logits, anchors=[level0, level1], topk_candidates=1000, nms_thresh=1.0)
    assert det.scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])


def test_top_k_counts_anchor_class_pairs():
    # top-k ranks (anchor, class) pairs: one anchor with two classes takes two of the k slots
    (det,) = _run(_grid({(0, 0): 0.9, (0, 1): 0.8, (2, 0): 0.7}), topk_candidates=2, nms_thresh=1.0)
    assert det.scores.tolist() == pytest.approx([0.9, 0.8])
    assert det.labels.tolist() == [0, 1]


def test_nms_is_class_wise():
    assert box_iou(ANCHORS[:1], ANCHORS[1:2]).item() > 0.5
    (det,) = _run(_grid({(0, 0): 0.9, (1, 0): 0.8}))  # same class, overlapping: the weaker is suppressed
    assert det.scores.tolist() == pytest.approx([0.9])
    torch.testing.assert_close(det.boxes, ANCHORS[:1])
    (det,) = _run(_grid({(0, 0): 0.9, (1, 1): 0.8}))  # different classes: both kept
    assert det.scores.tolist() == pytest.approx([0.9, 0.8])
    assert det.labels.tolist() == [0, 1]
    (det,) = _run(_grid({(0, 0): 0.9, (2, 0): 0.8}))  # same class, apart: both kept
    assert len(det.scores) == 2


def test_boxes_are_clipped_to_the_image_h_w():
    (det,) = _run(_grid({(3, 0): 0.9}))
    torch.testing.assert_close(det.boxes, torch.tensor([[60.0, 70.0, 80.0, 100.0]]))  # x to w = 80, y to h = 100
    deltas = torch.zeros(1, 4, 4)
    deltas[0, 2] = torch.tensor([-5.0, -5.0, 0.0, 0.0])  # far up and left of the image
    (det,) = _run(_grid({(2, 1): 0.9}), deltas)
    assert (det.boxes >= 0).all()


def test_detections_per_image_keeps_the_best():
    logits = _grid({(0, 0): 0.9, (2, 0): 0.8, (3, 1): 0.7, (2, 1): 0.6})
    (det,) = _run(logits, detections_per_image=2)
    assert det.scores.tolist() == pytest.approx([0.9, 0.8])


def test_output_is_sorted_and_typed():
    torch.manual_seed(0)
    n, k = 50, 3
    centres = torch.rand(n, 2) * 60 + 10
    anchors = torch.cat([centres - 8, centres + 8], 1)
    (det,) = _run(torch.randn(n, k), anchors=anchors, score_thresh=0.2, nms_thresh=0.5)
    assert len(det.scores) > 1
    assert torch.all(det.scores[:-1] >= det.scores[1:])
    assert det.boxes.dtype == torch.float32 and det.labels.dtype == torch.int64
    assert det.labels.min() >= 0 and det.labels.max() < k


def test_nothing_above_threshold_gives_empty_detections():
    dets = _run(torch.full((2, 4, 2), LOW), sizes=SIZE * 2)
    assert len(dets) == 2
    for det in dets:
        assert tuple(det.boxes.shape) == (0, 4) and tuple(det.scores.shape) == (0,) and tuple(det.labels.shape) == (0,)
        assert det.labels.dtype == torch.int64


def test_batched_equals_each_image_alone():
    torch.manual_seed(1)
    k = 3
    levels = []
    for n, s in ((64, 12.0), (16, 24.0)):
        centres = torch.rand(n, 2) * 100
        levels.append(torch.cat([centres - s, centres + s], 1))
    n_all = sum(a.shape[0] for a in levels)
    logits = torch.randn(2, n_all, k) * 2
    deltas = torch.randn(2, n_all, 4) * 0.2
    sizes = [(90, 100), (70, 60)]
    kw = dict(score_thresh=0.3, topk_candidates=20, nms_thresh=0.5, detections_per_image=15)
    batched = postprocess(logits, deltas, levels, sizes, CODER, **kw)
    for i in range(2):
        (alone,) = postprocess(logits[i : i + 1], deltas[i : i + 1], levels, sizes[i : i + 1], CODER, **kw)
        assert len(alone.scores) > 0
        for a, b in zip(batched[i], alone):
            torch.testing.assert_close(a, b)
        h, w = sizes[i]
        assert (batched[i].boxes[:, 0::2] <= w).all() and (batched[i].boxes[:, 1::2] <= h).all()


@pytest.mark.parametrize("anchors,classes,k", [(500, 7, 40), (30, 5, 40), (3, 4, 100), (200, 1, 10)])
def test_two_step_top_k_equals_a_top_k_over_all_pairs(anchors, classes, k):
    from retinanet.ops.postprocess import _topk_pairs

    torch.manual_seed(0)
    logits = torch.randn(3, anchors, classes)
    values, idx = _topk_pairs(logits, k)
    ref_values, ref_idx = logits.reshape(3, -1).topk(min(k, anchors * classes), dim=1)
    assert torch.equal(values, ref_values)
    assert torch.equal(idx.sort(1).values, ref_idx.sort(1).values)
    assert torch.equal(logits.reshape(3, -1).gather(1, idx), values)
