import pytest
import torch

from retinanet.inference.drawing import draw_detections, labels_readable
from retinanet.tools.anchor_report import POSITIVE
from retinanet.tools.inspection import draw_inspection


def _grid(n_side: int, image: int, box: int) -> torch.Tensor:
    """n_side x n_side boxes of `box` px spread over an `image` px square."""
    step = image / n_side
    corners = [(i * step + 1, j * step + 1) for i in range(n_side) for j in range(n_side)]
    return torch.tensor([[x, y, x + box, y + box] for x, y in corners])


def test_a_dense_scene_is_drawn_as_boxes_alone_and_a_sparse_one_with_labels():
    image = torch.rand(3, 512, 512)
    dense = _grid(34, 512, 8)  # 1,156 objects of 8 px: labels would cover the image
    scores, labels = torch.full((len(dense),), 0.83), torch.zeros(len(dense), dtype=torch.long)
    assert not labels_readable(dense, ["object 0.83"] * len(dense), (512, 512))
    auto = draw_detections(image, dense, scores, labels, ["object"])
    assert torch.equal(auto, draw_detections(image, dense, scores, labels, ["object"], mode="boxes"))
    assert not torch.equal(auto, draw_detections(image, dense, scores, labels, ["object"], mode="labels"))
    sparse = torch.tensor([[20.0, 20, 200, 160], [260, 300, 480, 500]])
    s_scores, s_labels = torch.tensor([0.9, 0.8]), torch.tensor([0, 1])
    assert labels_readable(sparse, ["a 0.90", "b 0.80"], (512, 512))
    auto = draw_detections(image, sparse, s_scores, s_labels, ["a", "b"])
    assert torch.equal(auto, draw_detections(image, sparse, s_scores, s_labels, ["a", "b"], mode="labels"))
    with pytest.raises(ValueError, match=r"draw mode 'big' is not one of"):
        draw_detections(image, sparse, s_scores, s_labels, ["a", "b"], mode="big")


def test_lines_follow_the_objects_size():
    # 6 px objects get 1 px lines (a 4 px line would hide them): the inside of each box stays as it was
    image = torch.zeros(3, 1024, 1024)
    boxes = _grid(10, 1024, 6)
    drawn = draw_detections(image, boxes, torch.ones(len(boxes)), torch.zeros(len(boxes), dtype=torch.long), ["o"])
    x1, y1 = (int(v) for v in boxes[0, :2])
    assert drawn[:, y1 + 2 : y1 + 5, x1 + 2 : x1 + 5].sum() == 0


def test_inspect_draws_dense_scenes_as_boxes_alone():
    image = torch.rand(3, 512, 512)
    boxes = _grid(30, 512, 8)
    status = torch.full((len(boxes),), POSITIVE)
    args = (image, boxes, status, torch.zeros(len(boxes), dtype=torch.long), ["o"], torch.ones(len(boxes)))
    assert torch.equal(draw_inspection(*args), draw_inspection(*args, mode="boxes"))
    assert not torch.equal(draw_inspection(*args), draw_inspection(*args, mode="labels"))
