import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.models.detection._utils import overwrite_eps
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.weights.torchvision import _replace_bn, from_torchvision, load_torchvision_coco


def _torchvision_model(build, num_classes=5, frozen=False, **kwargs):
    torch.manual_seed(0)
    tv = build(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    if frozen:
        _replace_bn(tv.backbone.body, FrozenBatchNorm2d)
        for m in tv.backbone.body.modules():
            if isinstance(m, FrozenBatchNorm2d):  # non-trivial statistics, so eps and the affine matter
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    # random heads give every anchor the prior score 0.01 < 0.05: spread the scores so there are detections
    for m in tv.head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.01)
    torch.nn.init.zeros_(tv.head.classification_head.cls_logits.bias)
    return tv.eval()


def _canonical(boxes, scores, labels):
    """Detections as a sorted table, so that equal sets compare equal whatever the order among equal scores."""
    table = torch.cat([scores[:, None].double(), labels[:, None].double(), boxes.double()], 1)
    order = sorted(range(len(table)), key=lambda i: tuple(table[i].tolist()))
    return table[order]


def _assert_same_detections(tv, ours, images):
    with torch.no_grad():
        ref = tv(images)
    got = ours.predict(images)
    assert len(ref) == len(got)
    total = 0
    for r, g in zip(ref, got):
        assert r["boxes"].shape == g.boxes.shape
        torch.testing.assert_close(
            _canonical(g.boxes, g.scores, g.labels),
            _canonical(r["boxes"], r["scores"], r["labels"]),
            rtol=1e-4,
            atol=1e-3,
        )
        total += len(g.scores)
    assert total > 0


IMAGES = [
    torch.rand(3, 150, 200, generator=torch.Generator().manual_seed(1)),
    torch.rand(3, 181, 130, generator=torch.Generator().manual_seed(2)),
]


@pytest.mark.parametrize("build", [retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2])
def test_same_detections_as_torchvision_module(build):
    tv = _torchvision_model(build, min_size=160, max_size=256)
    ours = from_torchvision(tv).eval()
    cfg = ours.config
    assert (cfg.min_size, cfg.max_size, cfg.detections_per_image, cfg.size_divisible) == (160, 256, 300, 32)
    assert cfg.p6_from == ("p5" if build is retinanet_resnet50_fpn else "c5")
    _assert_same_detections(tv, ours, IMAGES)


def test_state_dict_gets_torchvision_defaults_and_frozen_bn_eps_zero():
    tv = _torchvision_model(retinanet_resnet50_fpn, frozen=True)
    overwrite_eps(tv, 0.0)  # what torchvision does when it loads its published v1 weights
    state = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = from_torchvision(state)
    assert (ours.config.min_size, ours.config.max_size) == (800, 1333)
    assert isinstance(ours.backbone.bn1, FrozenBatchNorm2d) and ours.backbone.bn1.eps == 0.0
    # equal weights, checked directly (the full-size detection comparison is in the slow test below)
    torch.testing.assert_close(ours.head.cls_logits.weight, tv.head.classification_head.cls_logits.weight)
    torch.testing.assert_close(ours.fpn.lateral[0].weight, tv.backbone.fpn.inner_blocks[0][0].weight)
    torch.testing.assert_close(ours.backbone.layer4[2].bn3.running_var, tv.backbone.body.layer4[2].bn3.running_var)


def _legacy_layout(state):
    """The key layout of torchvision's published v1 checkpoint: head convs conv.{2i}, FPN blocks without '.0'."""
    out = {}
    for k, v in state.items():
        for head in ("classification_head", "regression_head"):
            for i in range(4):
                k = k.replace(f"head.{head}.conv.{i}.0.", f"head.{head}.conv.{2 * i}.")
        for blocks in ("inner_blocks", "layer_blocks"):
            for i in range(3):
                k = k.replace(f"fpn.{blocks}.{i}.0.", f"fpn.{blocks}.{i}.")
        out[k] = v
    return out


@pytest.mark.slow
def test_published_checkpoint_layout_gives_torchvision_detections(tmp_path):
    tv = _torchvision_model(retinanet_resnet50_fpn, num_classes=91, frozen=True)
    overwrite_eps(tv, 0.0)
    state = _legacy_layout({k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")})
    assert "head.classification_head.conv.2.weight" in state
    path = tmp_path / "retinanet_resnet50_fpn_coco.pth"
    torch.save(state, path)
    ours, categories = load_torchvision_coco("retinanet_resnet50_fpn", weights_path=path)
    assert len(categories) == 91 and categories[1] == {"id": 1, "name": "person"}
    assert ours.num_classes == 91
    small = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(3))]  # resized to 800 x 1066 by both
    _assert_same_detections(tv, ours.eval(), small)


def test_errors():
    with pytest.raises(ValueError, match="not a torchvision RetinaNet"):
        from_torchvision({"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="not found"):
        load_torchvision_coco("retinanet_resnet50_fpn", weights_path="/nonexistent/file.pth")
    with pytest.raises(ValueError, match="unknown torchvision RetinaNet"):
        load_torchvision_coco("fasterrcnn")
