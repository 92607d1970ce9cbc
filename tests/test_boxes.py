import math

import pytest
import torch

from retinanet.ops.boxes import (
    box_area,
    box_ioa,
    box_iou,
    clip_boxes,
    scale_boxes,
    validate_boxes,
    xywh_to_xyxy,
    xyxy_to_xywh,
)


def test_area_and_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 40.0]])
    assert box_area(b).tolist() == [100.0, 200.0]
    iou = box_iou(a, b)
    assert iou.shape == (1, 2)
    assert iou[0, 0].item() == pytest.approx(50 / 150)
    assert iou[0, 1].item() == 0.0


def test_iou_empty():
    assert box_iou(torch.zeros(0, 4), torch.ones(3, 4)).shape == (0, 3)


def test_ioa_is_fraction_of_first_box():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 10.0]])
    region = torch.tensor([[5.0, 0.0, 100.0, 100.0]])
    ioa = box_ioa(anchors, region)
    assert ioa[:, 0].tolist() == [0.5, 0.0]  # zero-area anchor gets 0, not nan


def test_clip():
    boxes = torch.tensor([[-5.0, -1.0, 50.0, 20.0]])
    assert clip_boxes(boxes, (10, 30)).tolist() == [[0.0, 0.0, 30.0, 10.0]]


def test_xywh_round_trip():
    boxes_xywh = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    boxes = xywh_to_xyxy(boxes_xywh)
    assert boxes.tolist() == [[1.0, 2.0, 4.0, 6.0]]
    assert torch.equal(xyxy_to_xywh(boxes), boxes_xywh)


def test_xywh_bad_shape_names_argument():
    with pytest.raises(ValueError, match="boxes_xywh"):
        xywh_to_xyxy(torch.zeros(3, 5))


def test_scale():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert scale_boxes(boxes, 2.0, 0.5).tolist() == [[2.0, 1.0, 6.0, 2.0]]


def test_validate_accepts_good_and_empty():
    validate_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0], [10.0, 10.0, 20.5, 30.0]]), (30, 21), where="x")
    validate_boxes(torch.zeros(0, 4), (10, 10))
    # within the one-pixel tolerance at the border
    validate_boxes(torch.tensor([[-0.5, 0.0, 10.5, 10.0]]), (10, 10))


@pytest.mark.parametrize(
    "bad, reason",
    [
        ([5.0, 0.0, 5.0, 1.0], "x2 <= x1"),
        ([0.0, 3.0, 1.0, 2.0], "y2 <= y1"),
        ([0.0, 0.0, math.nan, 1.0], "non-finite"),
        ([0.0, 0.0, math.inf, 1.0], "non-finite"),
        ([0.0, 0.0, 20.0, 5.0], "outside the image"),
    ],
)
def test_validate_names_place_index_and_values(bad, reason):
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0], bad])
    with pytest.raises(ValueError) as err:
        validate_boxes(boxes, (10, 10), where="annotations.json, image 12")
    msg = str(err.value)
    assert msg.startswith("annotations.json, image 12: box 2 ")
    assert reason in msg
    assert str(bad[0]) in msg


def test_validate_reports_first_bad_box():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [3.0, 0.0, 2.0, 1.0], [0.0, 5.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"^img 7: box 1 \[3.0, 0.0, 2.0, 1.0\]"):
        validate_boxes(boxes, where="img 7")


def test_validate_shape_and_dtype():
    with pytest.raises(ValueError, match="f.json: boxes must be"):
        validate_boxes(torch.zeros(2, 5), where="f.json")
    with pytest.raises(ValueError, match="float"):
        validate_boxes(torch.zeros(2, 4, dtype=torch.int64))
