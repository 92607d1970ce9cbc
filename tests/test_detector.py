import math

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from retinanet import losses as L
from retinanet.model.detector import RetinaNet, build_model
from retinanet.ops.postprocess import Detections

CLS_LOSSES = ["focal", "focal_star", "ce", "balanced_ce", "ohem", "quality_focal", "varifocal"]
BOX_LOSSES = ["smooth_l1", "l1", "giou", "diou", "ciou"]
SIZE = 128


def _tiny(**overrides) -> RetinaNet:
    torch.manual_seed(0)
    kw = dict(num_classes=3, min_size=SIZE, max_size=SIZE)
    kw.update(overrides)
    return build_model("retinanet_tiny", **kw)


def _target(boxes, labels, **extra) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        **extra,
    }


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = [
        _target([[10, 12, 60, 50], [70, 64, 118, 120]], [0, 2]),
        _target([[20, 70, 100, 110], [30, 8, 64, 52], [80, 10, 120, 40]], [1, 0, 0]),
    ]
    return images, targets


def _anchors(model: RetinaNet, size_hw: tuple[int, int] = (SIZE, SIZE)) -> torch.Tensor:
    """All anchors of a padded batch of size_hw (a multiple of 128: grids of size / 8 .. size / 128)."""
    grids = [(size_hw[0] // s, size_hw[1] // s) for s in (8, 16, 32, 64, 128)]
    return model.anchor_generator(grids, size_hw)


def _num_pos(model: RetinaNet, targets) -> int:
    """Positive anchors of a batch of SIZE x SIZE images under the model's own assigner."""
    grids = [(SIZE // s, SIZE // s) for s in (8, 16, 32, 64, 128)]
    per_level = model.anchor_generator.anchors_per_level(grids, (SIZE, SIZE))
    labels, _ = model.assign(torch.cat(per_level), targets, [len(a) for a in per_level])
    return int((labels >= 0).sum())


# --------------------------------------------------------------------------------------------------------------
# build_model


def test_presets_build_with_overrides():
    overrides = dict(
        num_classes=5,
        min_size=320,
        max_size=480,
        fpn_channels=64,
        head_channels=64,
        anchor_scales=(1.0, 2.0),
        aspect_ratios=(1.0,),
        cls_loss="ce",
        alpha=0.5,
        gamma=0.0,
        detections_per_image=7,
    )
    for name, body in [
        ("retinanet_r50_fpn", "resnet50"),
        ("retinanet_r101_fpn", "resnet101"),
        ("retinanet_r18_fpn", "resnet18"),
        ("retinanet_tiny", "resnet10"),
    ]:
        # on the meta device: the whole architecture, shapes included, without initialising 45M weights
        with torch.device("meta"):
            model = build_model(name, **overrides).eval()
            head = model(torch.empty(1, 3, 128, 128))
        cfg = model.config
        assert cfg.backbone == body
        for key, value in overrides.items():
            assert getattr(cfg, key) == value, (name, key)
        assert model.anchor_generator.num_anchors_per_location() == 2
        assert model.fpn.out_channels == 64
        assert model.head.cls_logits.out_channels == 2 * 5 and model.head.cls_logits.in_channels == 64
        assert model.head.box_deltas.out_channels == 2 * 4
        n = sum(h * w for h, w in head.grid_sizes) * 2
        assert head.grid_sizes == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
        assert tuple(head.cls_logits.shape) == (1, n, 5) and tuple(head.box_deltas.shape) == (1, n, 4)


def test_paper_preset_has_nine_anchors_and_the_paper_head():
    with torch.device("meta"):
        model = build_model("retinanet_r50_fpn")
    assert model.anchor_generator.num_anchors_per_location() == 9
    assert model.head.cls_logits.out_channels == 9 * 80
    assert sum(isinstance(m, nn.Conv2d) for m in model.head.cls_tower) == 4


def test_unknown_override_names_it():
    with pytest.raises(ValueError, match="fpn_channnels"):
        build_model("retinanet_tiny", fpn_channnels=32)


# --------------------------------------------------------------------------------------------------------------
# loss


@pytest.mark.parametrize(
    ("cls_loss", "box_loss", "assigner"),
    [(c, "smooth_l1", "iou") for c in CLS_LOSSES]
    + [("focal", b, "iou") for b in BOX_LOSSES[1:]]
    + [("focal", "smooth_l1", "atss"), ("quality_focal", "giou", "atss")],
)
def test_loss_is_a_finite_scalar_dict_for_every_loss(cls_loss, box_loss, assigner):
    model = _tiny(cls_loss=cls_loss, box_loss=box_loss, assigner=assigner)
    images, targets = _batch()
    losses = model.loss(images, targets)
    assert set(losses) == {"loss_cls", "loss_box"}
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.item() > 0, name
    (losses["loss_cls"] + losses["loss_box"]).backward()
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.conv1.weight.grad is not None  # the tiny preset trains the whole backbone


@pytest.mark.parametrize(
    ("cls_loss", "box_loss", "assigner"),
    [(c, "smooth_l1", "iou") for c in CLS_LOSSES] + [("focal", "giou", "iou"), ("varifocal", "ciou", "atss")],
)
def test_batched_loss_is_the_sum_of_single_image_losses(cls_loss, box_loss, assigner):
    """With the paper's normaliser, loss(batch) * max(P, 1) = sum_i loss(image i) * max(P_i, 1)."""
    model = _tiny(cls_loss=cls_loss, box_loss=box_loss, assigner=assigner).eval()  # eval: BatchNorm mixes nothing
    images, targets = _batch()
    pos = [_num_pos(model, [t]) for t in targets]
    assert pos[0] > 0 and pos[1] > 0 and pos[0] != pos[1]
    assert _num_pos(model, targets) == sum(pos)
    with torch.no_grad():
        batched = model.loss(images, targets)
        singles = [model.loss([im], [t]) for im, t in zip(images, targets)]
    for key in ("loss_cls", "loss_box"):
        expected = sum(s[key] * p for s, p in zip(singles, pos))
        torch.testing.assert_close(batched[key] * sum(pos), expected, rtol=1e-4, atol=1e-5)


def test_batched_loss_with_an_empty_image_is_the_sum_of_single_image_losses():
    model = _tiny().eval()
    images, targets = _batch()
    targets[0] = _target([], [])
    pos = [max(_num_pos(model, [t]), 1) for t in targets]
    with torch.no_grad():
        batched = model.loss(images, targets)
        singles = [model.loss([im], [t]) for im, t in zip(images, targets)]
    assert singles[0]["loss_box"] == 0
    for key in ("loss_cls", "loss_box"):
        expected = sum(s[key] * p for s, p in zip(singles, pos))
        torch.testing.assert_close(batched[key] * max(_num_pos(model, targets), 1), expected, rtol=1e-4, atol=1e-5)


def test_images_without_boxes():
    model = _tiny()
    images, targets = _batch()
    mixed = model.loss(images, [_target([], []), targets[1]])
    assert torch.isfinite(mixed["loss_cls"]) and mixed["loss_box"] > 0
    empty = model.loss(images, [_target([], []), {"boxes": torch.zeros(0), "labels": torch.zeros(0)}])
    assert torch.isfinite(empty["loss_cls"]) and empty["loss_cls"] > 0
    assert empty["loss_box"].item() == 0
    (empty["loss_cls"] + empty["loss_box"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.head.parameters() if p.grad is not None)


def test_crowd_boxes_make_no_positives():
    model = _tiny().eval()
    images, _ = _batch()
    crowd = _target([[10, 12, 60, 50]], [1], iscrowd=torch.tensor([True]))
    assert _num_pos(model, [crowd]) == 0
    assert model.loss(images[:1], [crowd])["loss_box"].item() == 0
    # a crowd box beside a normal box: every positive is matched to the normal one
    both = _target([[10, 12, 60, 50], [70, 64, 118, 120]], [1, 2], iscrowd=torch.tensor([True, False]))
    labels, matched = model.assign(_anchors(model), [both])
    assert (labels >= 0).sum() > 0
    assert set(labels[labels >= 0].tolist()) == {2}
    positives = matched[labels >= 0]
    assert torch.equal(positives, both["boxes"][1].expand_as(positives))
    # the anchors covered by the crowd region are ignored, not background
    assert (labels == -2).sum() > 0


def test_targets_follow_the_resize():
    """A constant image at half size with half-size boxes gives the same loss once the model resizes it."""
    model = _tiny().eval()
    small = torch.full((3, SIZE // 2, SIZE // 2), 0.5)
    full = torch.full((3, SIZE, SIZE), 0.5)
    with torch.no_grad():
        a = model.loss([small], [_target([[5, 6, 30, 25], [35, 32, 59, 60]], [0, 2])])
        b = model.loss([full], [_target([[10, 12, 60, 50], [70, 64, 118, 120]], [0, 2])])
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (_target([[10, 10, 20, 20], [5, 5, 40, 40], [30, 10, 30, 20]], [0, 1, 2]), r"target 1, box 2"),  # x2 == x1
        (_target([[10, 10, 20, 20], [5, 5, 40, 40], [30, 20, 40, 10]], [0, 1, 2]), r"target 1, box 2"),  # y2 < y1
        (_target([[10, 10, 20, 20], [5, 5, 40, 40], [30, 10, 40, math.nan]], [0, 1, 2]), r"target 1, box 2"),
        (_target([[10, 10, 20, 20], [5, 5, 40, 40]], [0, 3]), r"target 1, box 1: label 3"),
        (_target([[10, 10, 20, 20], [5, 5, 40, 40]], [0, -1]), r"target 1, box 1: label -1"),
        (_target([[10, 10, 20, 20], [5, 5, 40, 40]], [0, 1, 2]), r"target 1"),
        ({"boxes": torch.zeros(0, 4)}, r"target 1"),
    ],
)
def test_invalid_targets_name_target_and_box(target, match):
    model = _tiny()
    images, targets = _batch()
    with pytest.raises(ValueError, match=match):
        model.loss(images, [targets[0], target])


def test_images_and_targets_must_pair_up():
    model = _tiny()
    images, targets = _batch()
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        model.loss(images, targets[:1])


def test_ema_normaliser_moves_towards_the_positive_count():
    model = _tiny(normalizer="ema")
    images, targets = _batch()
    pos = _num_pos(model, targets)
    model.train()
    model.loss(images, targets)
    assert model.loss_normalizer.item() == pytest.approx(0.9 * 100 + 0.1 * pos)


# --------------------------------------------------------------------------------------------------------------
# predict


def test_predict_boxes_inside_the_image_sorted_and_limited():
    model = _tiny(score_thresh=0.0, detections_per_image=10).eval()
    images = [torch.rand(3, 100, 150), torch.rand(3, 90, 70)]
    dets = model.predict(images)
    assert len(dets) == 2
    for det, image in zip(dets, images):
        assert isinstance(det, Detections)
        h, w = image.shape[-2:]
        assert len(det.scores) == 10
        assert torch.all(det.scores[:-1] >= det.scores[1:])
        assert (det.boxes >= 0).all()
        assert (det.boxes[:, 0::2] <= w + 1e-3).all() and (det.boxes[:, 1::2] <= h + 1e-3).all()
        assert (det.boxes[:, 2:] >= det.boxes[:, :2]).all()
        assert det.labels.dtype == torch.int64 and (det.labels >= 0).all() and (det.labels < 3).all()


def test_predict_with_no_score_above_threshold_is_empty():
    model = _tiny().eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-30.0)
    dets = model.predict([torch.rand(3, SIZE, SIZE), torch.rand(3, 64, 96)])
    for det in dets:
        assert tuple(det.boxes.shape) == (0, 4) and det.scores.numel() == 0 and det.labels.numel() == 0


def test_predict_batched_equals_single():
    model = _tiny(score_thresh=0.0, detections_per_image=20).eval()
    images, _ = _batch()
    batched = model.predict(images)
    for image, det in zip(images, batched):
        (alone,) = model.predict([image])
        for a, b in zip(det, alone):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class _OneAnchorHead(nn.Module):
    """Stands in for the head: every score ~0 except class `label` of anchor `row`; all deltas 0."""

    def __init__(self, num_anchors: int, num_classes: int, row: int, label: int):
        super().__init__()
        self.a, self.k, self.row, self.label = num_anchors, num_classes, row, label

    def forward(self, features_per_level):
        b = features_per_level[0].shape[0]
        n = sum(f.shape[-2] * f.shape[-1] for f in features_per_level) * self.a
        cls = torch.full((b, n, self.k), -30.0)
        cls[:, self.row, self.label] = 5.0
        return cls, torch.zeros(b, n, 4)


def test_predict_maps_boxes_back_to_each_input_image():
    # both images are resized to 128 x 192 (scales 2 and 4), a multiple of 32 already: P3 is a 16 x 24 grid
    model = _tiny(min_size=128, max_size=256).eval()
    y, x, a = 5, 10, 4  # anchor type 4: aspect ratio 1, the second size 16 * 2^(1/3)
    model.head = _OneAnchorHead(9, 3, row=(y * 24 + x) * 9 + a, label=2)
    dets = model.predict([torch.rand(3, 64, 96), torch.rand(3, 32, 48)])
    cx, cy, half = (x + 0.5) * 8, (y + 0.5) * 8, 16 * 2 ** (1 / 3) / 2
    in_resized = torch.tensor([[cx - half, cy - half, cx + half, cy + half]])
    for det, scale in zip(dets, (2.0, 4.0)):
        assert det.labels.tolist() == [2]
        assert det.scores.tolist() == pytest.approx([torch.sigmoid(torch.tensor(5.0)).item()])
        torch.testing.assert_close(det.boxes, in_resized / scale)


def test_predict_without_resize_keeps_pixels():
    model = _tiny().eval()
    model.head = _OneAnchorHead(9, 3, row=(2 * 16 + 3) * 9 + 4, label=0)
    (det,) = model.predict([torch.rand(3, 100, 120)], resize=False)
    cx, cy, half = 3.5 * 8, 2.5 * 8, 16 * 2 ** (1 / 3) / 2
    torch.testing.assert_close(det.boxes, torch.tensor([[cx - half, cy - half, cx + half, cy + half]]))


# --------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
def test_cuda_loss_backward_predict():
    model = _tiny().cuda()
    images, targets = _batch()
    images = [im.cuda() for im in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    losses = model.loss(images, targets)
    total = losses["loss_cls"] + losses["loss_box"]
    assert torch.isfinite(total) and total.device.type == "cuda"
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    dets = model.predict(images)
    assert len(dets) == 2 and all(d.boxes.device.type == "cuda" for d in dets)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("kind", ["focal", "focal_star", "ce"])
def test_cuda_fused_losses_equal_cpu(monkeypatch, backend, kind):
    monkeypatch.setattr(L, "_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    n, k = 20_000, 80  # 1.6M logits: large enough for the compiled path under "auto"
    logits = torch.randn(n, k, generator=g) * 4
    labels = torch.randint(-2, k, (n,), generator=g)
    kw = dict(alpha=0.25, gamma=2.0 if kind != "ce" else 0.0, loss="focal_star" if kind == "focal_star" else "focal")
    results = []
    for device in ("cpu", "cuda"):
        x = logits.detach().to(device).clone().requires_grad_()
        loss = L.sigmoid_focal_loss_from_labels(x, labels.to(device), **kw)
        loss.backward()
        results.append((loss.detach().cpu(), x.grad.cpu()))
    (cpu_loss, cpu_grad), (gpu_loss, gpu_grad) = results
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
def test_cuda_model_loss_equals_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = _tiny().eval()
    images, targets = _batch()
    with torch.no_grad():
        cpu = model.loss(images, targets)
        model.cuda()
        gpu = model.loss([im.cuda() for im in images], [{k: v.cuda() for k, v in t.items()} for t in targets])
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Overfitting one batch: the whole detector learns


def _synthetic_batch():
    """Two 128 x 128 noise images with bright rectangles; class 0 is drawn in the red channel, class 1 in green."""
    g = torch.Generator().manual_seed(0)
    specs = [
        [(10, 12, 60, 50, 0), (70, 64, 118, 120, 1)],
        [(20, 70, 100, 110, 1), (30, 8, 64, 52, 0), (80, 10, 120, 40, 0)],
    ]
    images, targets = [], []
    for boxes in specs:
        image = torch.rand(3, SIZE, SIZE, generator=g) * 0.3
        for x1, y1, x2, y2, c in boxes:
            image[c, y1:y2, x1:x2] = 1.0
        images.append(image)
        targets.append(_target([b[:4] for b in boxes], [b[4] for b in boxes]))
    return images, targets


@pytest.mark.slow
def test_overfits_one_batch_and_finds_its_boxes():
    model = _tiny(num_classes=2).train()
    images, targets = _synthetic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for step in range(120):
        losses = model.loss(images, targets)
        total = losses["loss_cls"] + losses["loss_box"]
        assert torch.isfinite(total), f"step {step}: {losses}"
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
        if step % 20 == 0:
            print(f"step {step}: loss_cls {losses['loss_cls'].item():.4f} loss_box {losses['loss_box'].item():.4f}")
    final = sum(history[-5:]) / 5
    print(f"total loss: first {history[0]:.4f}, mean of the last 5 {final:.4f} ({history[0] / final:.0f}x less)")
    assert final < history[0] / 10
    model.eval()
    for det, target in zip(model.predict(images), targets):
        n = len(target["labels"])
        top = det.boxes[:n]
        print("top detections", det.scores[:n].tolist(), det.labels[:n].tolist())
        assert len(top) == n
        iou = box_iou(target["boxes"], top)  # [gt, det]
        for i in range(n):
            j = int(iou[i].argmax())
            assert iou[i, j] > 0.5, (i, iou)
            assert det.labels[j] == target["labels"][i]


@pytest.mark.parametrize("cls_loss", ["quality_focal", "varifocal"])
def test_iou_aware_losses_target_the_iou_of_each_positives_predicted_box(cls_loss):
    """The classification target of a positive anchor is the IoU of its decoded prediction with its object (at its
    class; 0 elsewhere), not 1: the loss equals the dense loss against those targets, normalised by the positives."""
    model = _tiny(cls_loss=cls_loss).eval()
    images, targets = _batch()
    with torch.no_grad():
        batch = model.preprocess(images, resize=False)
        head = model(batch.images)
        ours = model.compute_loss(head, targets, tuple(batch.images.shape[-2:]))["loss_cls"]
        per_level = model.anchors_per_level(head, tuple(batch.images.shape[-2:]))
        anchors = torch.cat(per_level)
        labels, matched = model.assign(anchors, targets, [len(a) for a in per_level])
        pos = labels >= 0
        decoded = model.box_coder.decode(head.box_deltas[pos].float(), anchors.expand(2, -1, -1)[pos])
        iou = box_iou(decoded, matched[pos]).diagonal()
        dense = torch.zeros_like(head.cls_logits)
        dense[pos] = nn.functional.one_hot(labels[pos], 3).float() * iou[:, None]
        valid = (labels != -2).float()[..., None]
        if cls_loss == "quality_focal":
            expected = (L.quality_focal_loss(head.cls_logits, dense, beta=2.0) * valid).sum()
        else:
            expected = (L.varifocal_loss(head.cls_logits, dense, 0.75, 2.0) * valid).sum()
    assert 0 < iou.min() and iou.max() < 1  # soft targets, not 0/1
    torch.testing.assert_close(ours, expected / pos.sum(), rtol=1e-5, atol=1e-6)
