"""Test-time augmentation (retinanet.ops.tta, retinanet.inference.tta): every view's boxes follow its pixels and
come back exactly; weighted boxes fusion by hand; a detector that finds a rectangle finds it through every view."""

from types import SimpleNamespace

import pytest
import torch

from retinanet.inference.tta import check_tta, predict_views
from retinanet.ops.postprocess import Detections
from retinanet.ops.tta import TTA_VIEWS, boxes_from_view, boxes_to_view, fuse_detections, view_image

RECT = (7, 4, 19, 11)  # x1, y1, x2, y2 of a rectangle in a 30 x 50 image (H x W)


def _image_with_rectangle(h: int = 30, w: int = 50) -> torch.Tensor:
    image = torch.zeros(3, h, w)
    x1, y1, x2, y2 = RECT
    image[:, y1:y2, x1:x2] = 1.0
    return image


def _bright_box(image: torch.Tensor) -> torch.Tensor:
    """[1, 4] XYXY pixel box of the bright pixels of a [3, H, W] image."""
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)


@pytest.mark.parametrize("view", TTA_VIEWS["d4"])
def test_boxes_follow_the_pixels_of_every_view_and_come_back(view):
    image = _image_with_rectangle()
    box = torch.tensor([RECT], dtype=torch.float32)
    seen = view_image(image, view)
    torch.testing.assert_close(boxes_to_view(box, view, (30, 50)), _bright_box(seen))
    torch.testing.assert_close(boxes_from_view(_bright_box(seen), view, (30, 50)), box)


def test_named_view_sets():
    assert TTA_VIEWS["flips"][0] == TTA_VIEWS["turns"][0] == TTA_VIEWS["d4"][0] == (0, False)  # the image as is first
    assert len(set(TTA_VIEWS["d4"])) == 8 and len(TTA_VIEWS["flips"]) == 3 and len(TTA_VIEWS["turns"]) == 4
    image = _image_with_rectangle()
    assert torch.equal(view_image(image, TTA_VIEWS["flips"][2]), image.flip(-2))  # the third: top-bottom
    with pytest.raises(ValueError, match="tta = 'all' is not one of"):
        check_tta("all")


def test_weighted_boxes_fusion_by_hand():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.6, 0.3, 0.8])
    labels = torch.tensor([0, 0, 0, 1])
    fused = fuse_detections(boxes, scores, labels, num_views=3)
    # class 0: [0,0,10,10] (.9) and [1,1,11,11] (.6) overlap (IoU 81/119 > .55): their score-weighted mean, score
    # mean(.9, .6) * 2 / 3; class 1's box is alone (.8 / 3), as is the far one (.3 / 3)
    torch.testing.assert_close(fused.boxes, torch.tensor([[0.4, 0.4, 10.4, 10.4], [0, 0, 10, 10], [20, 20, 30, 30]]))
    torch.testing.assert_close(fused.scores, torch.tensor([0.5, 0.8 / 3, 0.1]))
    assert fused.labels.tolist() == [0, 1, 0]
    # more boxes in a cluster than views (two from one view): the mean score is not inflated above it
    many = fuse_detections(boxes[:2].repeat(2, 1), scores[:2].repeat(2), labels[:2].repeat(2), num_views=2)
    torch.testing.assert_close(many.scores, torch.tensor([0.75]))
    empty = fuse_detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), num_views=3)
    assert len(empty.scores) == 0
    assert len(fuse_detections(boxes, scores, labels, 3, max_detections=2).scores) == 2


class _RectangleFinder:
    """A stand-in detector that finds the bright rectangle of each image it is given, at score .9, as predict()."""

    config = SimpleNamespace(detections_per_image=100)

    def predict(self, images, resize=True, score_thresh=None):
        return [Detections(_bright_box(im), torch.tensor([0.9]), torch.tensor([0])) for im in images]


@pytest.mark.parametrize("tta", ["flips", "turns", "d4"])
def test_predict_views_finds_the_rectangle_through_every_view(tta):
    images = [_image_with_rectangle(), _image_with_rectangle(40, 24)]
    for image, found in zip(images, predict_views(_RectangleFinder(), images, tta)):
        torch.testing.assert_close(found.boxes, _bright_box(image))
        torch.testing.assert_close(found.scores, torch.tensor([0.9]))


def test_the_predictor_with_tta_runs_the_model_once_per_view():
    from retinanet import build_model
    from retinanet.inference import Predictor

    torch.manual_seed(0)
    model = build_model("retinanet_tiny", num_classes=2, min_size=64, max_size=64, score_thresh=0.0)
    calls = []
    real = model.predict
    model.predict = lambda images, **kw: calls.append(len(images)) or real(images, **kw)
    found = Predictor(model, tta="d4", score_thresh=0.0).predict(torch.rand(3, 48, 80))
    assert calls == [1] * 8
    assert len(found) > 0 and (found.boxes[:, 2] <= 80 + 1e-3).all() and (found.boxes[:, 3] <= 48 + 1e-3).all()
    assert (found.scores <= 1).all()


def test_boxes_of_no_area_fuse_without_nan():
    boxes = torch.tensor([[5.0, 5, 5, 9], [5, 5, 5, 9], [0, 0, 4, 4]])  # two boxes of zero width
    fused = fuse_detections(boxes, torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0, 0, 0]), num_views=2)
    assert torch.isfinite(fused.boxes).all() and torch.isfinite(fused.scores).all()
