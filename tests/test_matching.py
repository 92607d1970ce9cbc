import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.models.detection._utils import Matcher as TVMatcher
from torchvision.ops import box_iou

from retinanet.ops.anchors import AnchorGenerator
from retinanet.ops.matching import BACKGROUND, IGNORE, BoxCoder, atss_match_anchors, match_anchors

SQUARE = [0.0, 0.0, 10.0, 10.0]


def test_codes_are_the_losses_defaults():
    assert (BACKGROUND, IGNORE) == (-1, -2)


@pytest.mark.parametrize("height, expected", [(5.0, 0), (4.5, IGNORE), (4.0, IGNORE), (3.9, BACKGROUND)])
def test_thresholds_by_hand(height, expected):
    # anchor [0, 0, 10, 10] vs gt [0, 0, 10, h]: IoU = h / 10
    anchors = torch.tensor([SQUARE])
    gt = torch.tensor([[0.0, 0.0, 10.0, height]])
    assert match_anchors(anchors, gt).tolist() == [expected]


def test_best_gt_wins():
    anchors = torch.tensor([SQUARE])
    gt = torch.tensor([[0.0, 0.0, 10.0, 6.0], [0.0, 0.0, 10.0, 9.0]])
    assert match_anchors(anchors, gt).tolist() == [1]


def test_low_quality_match_only_when_allowed():
    anchors = torch.tensor([SQUARE, [20.0, 0.0, 30.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 3.0]])  # best IoU 0.3, with anchor 0
    assert match_anchors(anchors, gt).tolist() == [BACKGROUND] * 3
    assert match_anchors(anchors, gt, allow_low_quality=True).tolist() == [0, BACKGROUND, BACKGROUND]


def test_low_quality_includes_ties_and_skips_zero_overlap():
    # the gt straddles anchors 0 and 1 equally (IoU 1/7 each); gt 1 overlaps no anchor
    anchors = torch.tensor([SQUARE, [10.0, 0.0, 20.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    gt = torch.tensor([[5.0, 0.0, 15.0, 2.5], [500.0, 500.0, 510.0, 510.0]])
    got = match_anchors(anchors, gt, allow_low_quality=True)
    assert got.tolist() == [0, 0, BACKGROUND]


def test_empty_image_is_all_background():
    anchors = AnchorGenerator()([(2, 2)] * 5, (16, 16))
    got = match_anchors(anchors, torch.zeros(0, 4), allow_low_quality=True)
    assert got.dtype == torch.int64 and got.shape == (anchors.shape[0],)
    assert bool((got == BACKGROUND).all())
    crowd = torch.zeros(0, dtype=torch.bool)
    assert bool((match_anchors(anchors, torch.zeros(0, 4), gt_is_crowd=crowd) == BACKGROUND).all())


def test_no_anchors():
    assert match_anchors(torch.zeros(0, 4), torch.tensor([SQUARE])).shape == (0,)


def test_crowd_regions():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # exactly the crowd box: not a target, covered -> IGNORE
            [2.0, 2.0, 8.0, 8.0],  # positive for the real gt, stays positive although inside the crowd region
            [5.0, 0.0, 15.0, 10.0],  # half inside the crowd region (IoA 0.5) -> IGNORE
            [6.0, 0.0, 16.0, 10.0],  # IoA 0.4 -> BACKGROUND
            [100.0, 100.0, 110.0, 110.0],  # far away -> BACKGROUND
        ]
    )
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 8.0, 8.0]])
    crowd = torch.tensor([True, False])
    got = match_anchors(anchors, gt, gt_is_crowd=crowd)
    assert got.tolist() == [IGNORE, 1, IGNORE, BACKGROUND, BACKGROUND]
    # only crowd boxes: nothing to match, covered anchors ignored
    got = match_anchors(anchors, gt[:1], gt_is_crowd=crowd[:1], allow_low_quality=True)
    assert got.tolist() == [IGNORE, IGNORE, IGNORE, BACKGROUND, BACKGROUND]


def test_crowd_indices_map_back_to_gt_boxes():
    anchors = torch.tensor([SQUARE, [50.0, 50.0, 60.0, 60.0]])
    gt = torch.tensor([[200.0, 200.0, 300.0, 300.0], [50.0, 50.0, 60.0, 60.0], SQUARE])
    crowd = torch.tensor([True, False, False])
    assert match_anchors(anchors, gt, gt_is_crowd=crowd).tolist() == [2, 1]


def _random_case(seed: int, num_gt: int):
    g = torch.Generator().manual_seed(seed)
    anchors = AnchorGenerator(strides=(8, 16, 32, 64, 128))([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], (64, 64))
    xy = torch.rand(num_gt, 2, generator=g) * 56
    wh = torch.rand(num_gt, 2, generator=g) * 60 + 4
    gt = torch.cat([xy, xy + wh], dim=1)
    return anchors, gt, g


@pytest.mark.parametrize("allow_low_quality", [False, True])
def test_chunked_equals_unchunked(allow_low_quality):
    for seed in range(3):
        anchors, gt, g = _random_case(seed, num_gt=7)
        crowd = torch.rand(7, generator=g) < 0.3
        for is_crowd in (None, crowd):
            full = match_anchors(anchors, gt, allow_low_quality=allow_low_quality, gt_is_crowd=is_crowd)
            # 7 values = one anchor per chunk (7 gt boxes), 50 = 7 anchors, 333 = 47: chunks of uneven last size
            for chunk in (7, 50, 333) if seed == 0 else (50, 333):
                small = match_anchors(
                    anchors, gt, allow_low_quality=allow_low_quality, gt_is_crowd=is_crowd, chunk_elements=chunk
                )
                assert torch.equal(small, full), (seed, chunk)


@pytest.mark.parametrize("allow_low_quality", [False, True])
def test_equals_torchvision_matcher(allow_low_quality):
    for seed in range(3):
        anchors, gt, _ = _random_case(seed, num_gt=5)
        iou = box_iou(gt, anchors)
        assert bool((iou.max(dim=1).values > 0).all())  # torchvision also low-quality matches at IoU 0
        expected = TVMatcher(0.5, 0.4, allow_low_quality_matches=allow_low_quality)(iou)
        got = match_anchors(anchors, gt, allow_low_quality=allow_low_quality, chunk_elements=100)
        assert torch.equal(got, expected)


def test_bad_args():
    with pytest.raises(ValueError, match="bg_iou"):
        match_anchors(torch.zeros(1, 4), torch.zeros(1, 4), fg_iou=0.4, bg_iou=0.5)
    with pytest.raises(ValueError, match="gt_is_crowd"):
        match_anchors(torch.zeros(1, 4), torch.zeros(2, 4), gt_is_crowd=torch.zeros(3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------------
# Box coding


def _boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 500
    wh = torch.rand(n, 2, generator=g) * 300 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_by_hand():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    boxes = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14) vs (5, 10); size (20, 20) vs (10, 20)
    deltas = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode(anchors, boxes)
    torch.testing.assert_close(deltas, torch.tensor([[10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 0.0]]))


def test_round_trip():
    anchors, boxes = _boxes(200, 0), _boxes(200, 1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights=weights)
        torch.testing.assert_close(coder.decode(coder.encode(anchors, boxes), anchors), boxes, rtol=1e-5, atol=1e-3)


def test_torchvision_parity():
    anchors, boxes = _boxes(300, 2), _boxes(300, 3)
    tv = TVBoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    ours = BoxCoder()
    deltas = ours.encode(anchors, boxes)
    torch.testing.assert_close(deltas, tv.encode_single(boxes, anchors), rtol=0, atol=0)
    wild = deltas * 3 + torch.randn(300, 4, generator=torch.Generator().manual_seed(4)) * 4  # reaches the clamp
    torch.testing.assert_close(ours.decode(wild, anchors), tv.decode_single(wild, anchors), rtol=0, atol=0)


def test_decode_clamps_size():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    boxes = BoxCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchors)
    torch.testing.assert_close(boxes, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))
    assert bool(torch.isfinite(boxes).all())


def test_half_inputs_computed_in_float32():
    anchors, boxes = _boxes(50, 5), _boxes(50, 6)
    coder = BoxCoder()
    deltas = coder.encode(anchors.half(), boxes.half())
    assert deltas.dtype == torch.float32
    torch.testing.assert_close(deltas, coder.encode(anchors.half().float(), boxes.half().float()))
    decoded = coder.decode(deltas.half(), anchors.half())
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, coder.decode(deltas.half().float(), anchors.half().float()))


def test_empty_coding():
    coder = BoxCoder()
    assert coder.encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


def test_coder_bad_shapes():
    with pytest.raises(ValueError, match="anchors and boxes"):
        BoxCoder().encode(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weights"):
        BoxCoder(weights=(1.0, 1.0, 0.0, 1.0))


# --------------------------------------------------------------------------------------------------------------
# ATSS


def _grid_anchors(stride: int, size: float, extent: int = 100) -> torch.Tensor:
    """One square anchor of side `size` per cell of a stride-`stride` grid over [0, extent)^2, row-major."""
    c = torch.arange(stride / 2, extent, stride, dtype=torch.float64)
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    return torch.stack([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], 1)


def test_atss_hand_worked_equal_ious_all_nine_nearest_are_positive():
    # a 30 px box centred on an anchor centre (35, 35): its 9 nearest 10 px anchors lie inside it, each IoU 100/900;
    # the IoUs are equal, so the threshold (mean + std = 1/9) keeps all nine, and nothing else is positive
    anchors = _grid_anchors(10, 10.0)
    box = torch.tensor([[20.0, 20, 50, 50]], dtype=torch.float64)
    matches = atss_match_anchors(anchors, box, [len(anchors)], topk=9)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = ((centres - 35).abs() <= 10).all(dim=1)
    assert expected.sum() == 9
    assert torch.equal(matches >= 0, expected) and set(matches[expected].tolist()) == {0}
    assert set(matches[~expected].tolist()) == {BACKGROUND}


def _atss_reference(anchors, boxes, num_per_level, topk):
    """ATSS written out box by box and level by level, as the paper's algorithm 1."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    best_iou = torch.full((len(anchors),), -1.0, dtype=torch.float64)
    matches = torch.full((len(anchors),), BACKGROUND)
    for g, box in enumerate(boxes):
        centre = (box[:2] + box[2:]) / 2
        candidates, start = [], 0
        for n in num_per_level:
            d = ((centres[start : start + n] - centre) ** 2).sum(1).sqrt()
            candidates += (torch.argsort(d, stable=True)[: min(topk, n)] + start).tolist()
            start += n
        ious = box_iou(box[None], anchors[candidates])[0]
        threshold = ious.mean() + ious.std()
        for a, iou in zip(candidates, ious.tolist()):
            inside = bool((centres[a] > box[:2]).all() and (centres[a] < box[2:]).all())
            if iou >= threshold and inside and iou > best_iou[a]:
                best_iou[a], matches[a] = iou, g
    return matches


def test_atss_equals_the_papers_algorithm_on_two_levels_and_overlapping_boxes():
    anchors = torch.cat([_grid_anchors(8, 16.0, 96), _grid_anchors(16, 32.0, 96)])
    num_per_level = [144, 36]
    boxes = torch.tensor([[10.0, 13, 47, 38], [30, 20, 71, 66], [5, 60, 22, 91], [50, 4, 93, 30]], dtype=torch.float64)
    ours = atss_match_anchors(anchors, boxes, num_per_level, topk=5, chunk_elements=50)
    assert torch.equal(ours, _atss_reference(anchors, boxes, num_per_level, topk=5))
    assert set(ours[ours >= 0].tolist()) == {0, 1, 2, 3}  # every box has positives
    one_chunk = atss_match_anchors(anchors, boxes, num_per_level, topk=5)
    assert torch.equal(ours, one_chunk)


def test_atss_empty_crowd_and_bad_levels():
    anchors = _grid_anchors(10, 10.0)
    assert set(atss_match_anchors(anchors, torch.zeros(0, 4, dtype=torch.float64), [100]).tolist()) == {BACKGROUND}
    boxes = torch.tensor([[20.0, 20, 50, 50], [60, 60, 95, 95]], dtype=torch.float64)
    matches = atss_match_anchors(anchors, boxes, [100], gt_is_crowd=torch.tensor([False, True]))
    assert set(matches[matches >= 0].tolist()) == {0}  # a crowd region is never a target...
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    in_crowd = ((centres > 62) & (centres < 93)).all(dim=1)
    assert (matches[in_crowd] == IGNORE).all()  # ...and the anchors it covers are ignored
    with pytest.raises(ValueError, match="sums to"):
        atss_match_anchors(anchors, boxes, [50, 40])
