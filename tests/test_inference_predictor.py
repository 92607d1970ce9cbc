"""retinanet.load(...).predict on every kind of input gives the detections of the evaluation transform +
model.predict(resize=False), mapped back to the image's own pixels, with the class names."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

import retinanet
from retinanet.config import model_config
from retinanet.data import eval_transforms
from retinanet.inference import Predictor
from retinanet.model import build_model
from retinanet.model.checkpoint import save_checkpoint
from retinanet.model.detector import build_from_config

NAMES = ("ant", "bee", "cat")
H, W = 50, 70  # resized to 64 x 90 by min_size 64, max_size 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model whose random head scores anchors above the threshold (weights spread, no prior bias)."""
    torch.manual_seed(0)
    cfg = model_config(
        "retinanet_tiny",
        num_classes=3,
        class_names=NAMES,
        category_ids=(4, 7, 9),
        min_size=64,
        max_size=96,
        detections_per_image=20,
    )
    model = build_from_config(cfg)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls_logits.weight, std=0.05)
        torch.nn.init.zeros_(model.head.cls_logits.bias)
    return save_checkpoint(tmp_path_factory.mktemp("predictor") / "last.pt", model.eval())


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _reference(model, image: Tensor, *batch_mates: Tensor):
    """The evaluation path by hand: eval transform, predict without resizing (in one batch with `batch_mates`, whose
    padding the image shares), boxes divided by the image's scale."""
    resized = [eval_transforms(64, 96)(tv_tensors.Image(im)).as_subclass(Tensor) for im in (image, *batch_mates)]
    d = model.predict(resized, resize=False)[0]
    sy, sx = resized[0].shape[-2] / image.shape[-2], resized[0].shape[-1] / image.shape[-1]
    return d.boxes / torch.tensor([sx, sy, sx, sy]), d.scores, d.labels


def _assert_same(found, reference):
    boxes, scores, labels = reference
    assert len(found) == len(scores) > 0
    torch.testing.assert_close(found.boxes, boxes)
    torch.testing.assert_close(found.scores, scores)
    assert torch.equal(found.labels, labels)


@pytest.mark.parametrize("kind", ["path", "pil", "numpy", "uint8 tensor"])
def test_every_uint8_input_gives_the_evaluation_detections(checkpoint, pixels, kind, tmp_path):
    det = retinanet.load(checkpoint, score_thresh=0.0)
    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    Image.fromarray(pixels).save(tmp_path / "a.png")  # lossless: the same pixels come back
    given = {"path": str(tmp_path / "a.png"), "pil": Image.fromarray(pixels), "numpy": pixels, "uint8 tensor": image}[
        kind
    ]
    found = det.predict(given)
    _assert_same(found, _reference(det.model, image))
    assert found.image_size == (H, W) and found.names == [NAMES[k] for k in found.labels.tolist()]
    assert found.category_ids == [(4, 7, 9)[k] for k in found.labels.tolist()]
    assert found.source == (str(tmp_path / "a.png") if kind == "path" else None)
    # in the original pixels: inside the 70 x 50 image, not the 90 x 64 one the network saw
    assert found.boxes[:, 2].max() <= W + 1e-4 and found.boxes[:, 3].max() <= H + 1e-4
    assert found.boxes[:, 2].max() > 64  # ... and spread over it


def test_a_float_tensor_is_resized_as_evaluation_and_as_the_model_resizes(checkpoint, pixels):
    det = retinanet.load(checkpoint, score_thresh=0.0)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    found = det.predict(image)
    _assert_same(found, _reference(det.model, image))
    (own,) = det.model.predict([image], resize=True)  # the model's own resize: the same rule and kernel
    torch.testing.assert_close(found.boxes, own.boxes, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(found.scores, own.scores, atol=1e-5, rtol=1e-4)


def test_a_list_gives_a_list_in_order_batch_by_batch(checkpoint, pixels, tmp_path):
    det = retinanet.load(checkpoint, score_thresh=0.0, batch_size=2)
    other = np.ascontiguousarray(pixels[::-1, :40])  # 50 x 40: resized to 80 x 64, so its batch pads to 96 x 96
    paths = []
    for i, arr in enumerate([pixels, other, pixels]):
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    found = det.predict(paths)
    assert isinstance(found, list) and [f.image_size for f in found] == [(H, W), (H, 40), (H, W)]
    first, second = (torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in (pixels, other))
    # images are predicted batch_size at a time, padded together: as evaluation batches them
    _assert_same(found[0], _reference(det.model, first, second))
    _assert_same(found[1], _reference(det.model, second, first))
    _assert_same(found[2], _reference(det.model, first))


def test_nothing_above_the_threshold_is_an_empty_prediction(checkpoint, pixels):
    found = retinanet.load(checkpoint, score_thresh=1.0).predict(pixels)
    assert len(found) == 0 and found.boxes.shape == (0, 4) and found.names == [] and found.to_dicts() == []


@pytest.mark.parametrize(
    "bad, message",
    [
        (42, "image 0: cannot take a int"),
        (np.zeros((8, 8, 3), dtype=np.float32), "expected an HxWx3 uint8 array"),
        (torch.zeros(4, 8, 8), r"expected a \[3, H, W\] uint8 or float tensor"),
        ("missing.jpg", "missing.jpg: image file not found"),
    ],
)
def test_a_bad_input_is_a_clear_error(checkpoint, bad, message):
    with pytest.raises(ValueError, match=message):
        retinanet.load(checkpoint).predict(bad)


def test_a_predictor_threshold_below_the_models_is_honoured_and_a_lower_call_threshold_refused():
    torch.manual_seed(0)
    model = build_model("retinanet_tiny", num_classes=1, min_size=64, max_size=64, detections_per_image=5)
    image = torch.rand(3, 60, 64)
    assert model.config.score_thresh == 0.05  # an untrained head scores about 0.01 (the prior): none above it
    assert len(Predictor(model).predict(image).boxes) == 0
    found = Predictor(model, score_thresh=0.0).predict(image)
    assert len(found.boxes) == 5 and float(found.scores.min()) < 0.05
    with pytest.raises(ValueError, match="below the predictor's own 0.05"):
        Predictor(model).predict(image, score_thresh=0.0)
