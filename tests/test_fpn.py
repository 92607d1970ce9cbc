import pytest
import torch
import torch.nn.functional as F

from retinanet.model.fpn import FPN

IN_CHANNELS = (16, 24, 40)


def _features(batch: int = 2, size: int = 256) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, c, size // s, size // s) for c, s in zip(IN_CHANNELS, (8, 16, 32))]


@pytest.mark.parametrize("p6_from", ["c5", "p5"])
def test_p3_to_p7_shapes_and_strides(p6_from):
    fpn = FPN(IN_CHANNELS, out_channels=32, p6_from=p6_from)
    outs = fpn(_features(size=256))
    assert len(outs) == 5
    for p, stride in zip(outs, (8, 16, 32, 64, 128)):
        assert tuple(p.shape) == (2, 32, 256 // stride, 256 // stride)


def test_p6_input_channels_follow_its_source():
    assert FPN(IN_CHANNELS, 32, "c5").p6.in_channels == IN_CHANNELS[-1]
    assert FPN(IN_CHANNELS, 32, "p5").p6.in_channels == 32


@pytest.mark.parametrize("p6_from", ["c5", "p5"])
def test_p6_and_p7_are_computed_from_the_named_source(p6_from):
    fpn = FPN(IN_CHANNELS, out_channels=32, p6_from=p6_from)
    feats = _features()
    with torch.no_grad():
        p3, p4, p5, p6, p7 = fpn(feats)
        source = feats[-1] if p6_from == "c5" else p5
        torch.testing.assert_close(p6, fpn.p6(source))
        torch.testing.assert_close(p7, fpn.p7(F.relu(p6)))  # ReLU between P6 and P7 (the paper)


def test_top_down_pathway_reaches_p3():
    fpn = FPN(IN_CHANNELS, out_channels=32)
    feats = [f.requires_grad_() for f in _features()]
    p3 = fpn(feats)[0]
    p3.sum().backward()
    assert feats[2].grad.abs().sum() > 0  # C5 reaches P3 through the top-down sums


def test_odd_sizes_upsample_to_the_lateral_size():
    fpn = FPN(IN_CHANNELS, out_channels=8)
    feats = [torch.randn(1, 16, 13, 9), torch.randn(1, 24, 7, 5), torch.randn(1, 40, 4, 3)]
    outs = fpn(feats)
    assert [tuple(p.shape[-2:]) for p in outs] == [(13, 9), (7, 5), (4, 3), (2, 2), (1, 1)]


def test_bad_p6_source_raises():
    with pytest.raises(ValueError, match="p6_from"):
        FPN(IN_CHANNELS, 32, p6_from="c4")
