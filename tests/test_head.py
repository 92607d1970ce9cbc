import math

import pytest
import torch
from torch import nn

from retinanet.model.head import RetinaNetHead, _flatten
from retinanet.ops.anchors import AnchorGenerator

GRIDS = [(8, 6), (4, 3), (2, 2)]


def _features(batch: int = 2, channels: int = 32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, channels, h, w) for h, w in GRIDS]


def test_output_shapes():
    head = RetinaNetHead(in_channels=32, num_anchors=9, num_classes=5, channels=32, num_convs=2)
    cls, box = head(_features())
    n = sum(h * w * 9 for h, w in GRIDS)
    assert tuple(cls.shape) == (2, n, 5)
    assert tuple(box.shape) == (2, n, 4)


def test_anchor_count_per_level_is_hw_times_a():
    head = RetinaNetHead(in_channels=32, num_anchors=9, num_classes=3, channels=32, num_convs=1)
    for h, w in GRIDS:
        cls, box = head([torch.randn(1, 32, h, w)])
        assert cls.shape[1] == box.shape[1] == h * w * 9


def test_prior_initialisation():
    torch.manual_seed(0)
    head = RetinaNetHead(in_channels=256, num_anchors=9, num_classes=80, channels=256, num_convs=4, prior_prob=0.01)
    torch.testing.assert_close(head.cls_logits.bias, torch.full_like(head.cls_logits.bias, -math.log(99)))
    torch.testing.assert_close(torch.sigmoid(head.cls_logits.bias), torch.full_like(head.cls_logits.bias, 0.01))
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 * 4 + 2
    for conv in convs:
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert abs(conv.weight.mean().item()) < 1e-3
        if conv is not head.cls_logits:
            assert conv.bias is None or torch.all(conv.bias == 0)
    # every anchor starts at foreground confidence ~pi
    cls, _ = head([torch.randn(1, 256, 4, 4)])
    assert torch.sigmoid(cls).mean().item() == pytest.approx(0.01, rel=0.2)


def test_group_norm_option():
    head = RetinaNetHead(in_channels=64, num_anchors=9, num_classes=3, channels=64, num_convs=2, norm="gn")
    gns = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 4 and all(g.num_groups == 32 for g in gns)
    for tower in (head.cls_tower, head.box_tower):
        assert all(m.bias is None for m in tower.modules() if isinstance(m, nn.Conv2d))  # GN makes the bias redundant
    plain = RetinaNetHead(in_channels=64, num_anchors=9, num_classes=3, channels=64, num_convs=2)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    with pytest.raises(ValueError, match="bn"):
        RetinaNetHead(in_channels=64, num_anchors=9, num_classes=3, norm="bn")
    with pytest.raises(ValueError, match="prior_prob"):
        RetinaNetHead(in_channels=64, num_anchors=9, num_classes=3, prior_prob=1.0)


def test_cls_and_box_subnets_have_separate_weights():
    head = RetinaNetHead(in_channels=32, num_anchors=9, num_classes=3, channels=32, num_convs=2)
    cls_params = {id(p) for p in head.cls_tower.parameters()}
    assert not cls_params & {id(p) for p in head.box_tower.parameters()}


def test_flatten_orders_location_row_major_then_anchor():
    b, a, n, h, w = 2, 3, 4, 5, 7
    x = torch.empty(b, a * n, h, w)
    for bi in range(b):
        for ai in range(a):
            for j in range(n):
                for y in range(h):
                    for xx in range(w):
                        x[bi, ai * n + j, y, xx] = bi * 1e5 + y * 1e3 + xx * 10 + ai + j / 10
    out = _flatten(x, n)
    assert tuple(out.shape) == (b, h * w * a, n)
    for bi in range(b):
        for y in range(h):
            for xx in range(w):
                for ai in range(a):
                    for j in range(n):
                        idx = (y * w + xx) * a + ai
                        assert out[bi, idx, j] == x[bi, ai * n + j, y, xx]


def test_head_output_index_matches_anchor_generator_index():
    """A one-hot feature at (level, y, x) lights up exactly the head rows of the anchors centred there, with the
    anchor type of each row given by its channel group: the head's and the anchor generator's orders agree."""
    k, c = 2, 4
    sizes = ((16.0, 20.0), (32.0, 40.0), (64.0, 80.0))
    ratios = (0.5, 1.0, 2.0)
    gen = AnchorGenerator(sizes_per_level=sizes, aspect_ratios=ratios, strides=(8, 16, 32))
    a = gen.num_anchors_per_location()
    head = RetinaNetHead(in_channels=c, num_anchors=a, num_classes=k, channels=c, num_convs=0)
    with torch.no_grad():
        for conv, per in ((head.cls_logits, k), (head.box_deltas, 4)):
            conv.weight.zero_()
            conv.bias.zero_()
            # output channel (anchor type t, entry j) = (t * per + j + 1) x input channel 0, centre tap only
            for ch in range(a * per):
                conv.weight[ch, 0, 1, 1] = ch + 1
    grids = [(6, 5), (3, 3), (2, 2)]
    anchors = gen.anchors_per_level(grids, (48, 40))
    offsets = [0] + list(torch.tensor([h * w * a for h, w in grids]).cumsum(0)[:-1].tolist())
    for level, (y0, x0) in [(0, (4, 3)), (1, (2, 1)), (2, (1, 0))]:
        feats = [torch.zeros(1, c, h, w) for h, w in grids]
        feats[level][0, 0, y0, x0] = 1.0
        with torch.no_grad():
            cls, box = head(feats)
        rows = torch.nonzero(cls[0].abs().sum(1)).squeeze(1)
        assert torch.equal(rows, torch.nonzero(box[0].abs().sum(1)).squeeze(1))
        assert rows.tolist() == [offsets[level] + (y0 * grids[level][1] + x0) * a + t for t in range(a)]
        stride = (8, 16, 32)[level]
        for t, row in enumerate(rows.tolist()):
            assert cls[0, row].tolist() == [t * k + j + 1 for j in range(k)]
            assert box[0, row].tolist() == [t * 4 + j + 1 for j in range(4)]
            anchor = anchors[level][row - offsets[level]]
            centre = ((anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2)
            assert centre[0].item() == pytest.approx((x0 + 0.5) * stride)
            assert centre[1].item() == pytest.approx((y0 + 0.5) * stride)
            # anchor type t: aspect ratio t // len(sizes), size t % len(sizes)
            ratio, size = ratios[t // 2], sizes[level][t % 2]
            w, h = (anchor[2] - anchor[0]).item(), (anchor[3] - anchor[1]).item()
            assert h / w == pytest.approx(ratio)
            assert math.sqrt(w * h) == pytest.approx(size)
