import pytest
import torch
import torch.nn.functional as F
from numerics import assert_as_accurate, float64_copy

from retinanet import build_model
from retinanet.model.conv import Conv2d, conv2d, winograd_applies, winograd_conv3x3


def _uses_winograd(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "Winograd" in y.grad_fn.name()


@pytest.mark.parametrize("hw", [(8, 8), (7, 13), (1, 1), (4, 5), (17, 9)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_equals_direct_convolution_in_float64(hw, with_bias, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *hw, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if with_bias else None
    torch.testing.assert_close(winograd_conv3x3(x, w, b), F.conv2d(x, w, b, padding=1), rtol=1e-10, atol=1e-10)


def test_float32_error_is_that_of_float32_rounding():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 30, 30)
    w = torch.randn(32, 64, 3, 3) * 0.05
    b = torch.randn(32)
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    err = (winograd_conv3x3(x, w, b).double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-5


@pytest.mark.parametrize("band_bytes", [1, 5000])
def test_bands_of_tile_rows_give_the_whole_map_result(monkeypatch, band_bytes):
    # a map split into bands of 1 or 2 tile rows, the last one partial: the same output and gradients
    import retinanet.ops.winograd as W

    monkeypatch.setattr(W, "BAND_BYTES", band_bytes)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert W._band_rows(x, W._tiles(9), 4) < W._tiles(13)
    torch.testing.assert_close(winograd_conv3x3(x, w, b), F.conv2d(x, w, b, padding=1), rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(winograd_conv3x3, (x, w, b))


def test_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(winograd_conv3x3, (x, w, b))


@pytest.mark.parametrize("hw", [(12, 12), (9, 14)])
def test_float32_gradients_match_direct(hw):
    torch.manual_seed(0)
    x = torch.randn(2, 16, *hw).contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3) * 0.1
    b = torch.randn(24)
    g = torch.randn(2, 24, *hw)
    grads = []
    for fn in (winograd_conv3x3, lambda *a: F.conv2d(*a, padding=1)):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        fn(xs, ws, bs).backward(g)
        grads.append((xs.grad, ws.grad, bs.grad))
    for a, ref in zip(*grads):
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_only_the_needed_gradients_are_computed(monkeypatch):
    import retinanet.ops.winograd as W

    calls = []
    real = W._forward
    monkeypatch.setattr(W, "_forward", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    winograd_conv3x3(x, w).sum().backward()
    assert w.grad is not None and x.grad is None
    assert len(calls) == 1  # the forward only: no data gradient for an input that does not need one
    calls.clear()
    x.requires_grad_()
    w.grad = None
    winograd_conv3x3(x, w.detach()).sum().backward()
    assert x.grad is not None and w.grad is None and len(calls) == 2  # forward + data gradient


def test_output_can_be_modified_in_place_under_autograd():
    # the model applies ReLU in place on convolution outputs
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    y = torch.relu_(winograd_conv3x3(x, w))
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="weight"):
        winograd_conv3x3(torch.randn(1, 4, 8, 8), torch.randn(4, 4, 5, 5))
    with pytest.raises(ValueError, match="weight"):
        winograd_conv3x3(torch.randn(1, 3, 8, 8), torch.randn(4, 4, 3, 3))


def _big(c: int = 128, side: int = 32):
    return torch.randn(1, c, side, side, requires_grad=True), torch.randn(c, c, 3, 3) * 0.01


def test_auto_takes_the_machines_measured_choice_for_what_winograd_computes(monkeypatch):
    import retinanet.runtime.fastpath as fastpath

    asked = []
    monkeypatch.setattr(
        fastpath, "conv3x3_algorithm", lambda x, w, kernel, run: asked.append(tuple(x.shape)) or "winograd"
    )
    x, w = _big()
    assert winograd_applies(x, w, 1, 1, 1, 1) and _uses_winograd(conv2d(x, w, None, 1, 1))
    assert asked == [(1, 128, 32, 32)] * 2
    monkeypatch.setattr(fastpath, "conv3x3_algorithm", lambda x, w, kernel, run: "direct")
    assert not _uses_winograd(conv2d(x, w, None, 1, 1))
    # what Winograd does not compute is never measured
    monkeypatch.setattr(
        fastpath, "conv3x3_algorithm", lambda x, w, kernel, run: pytest.fail(f"asked about {tuple(x.shape)}")
    )
    assert not _uses_winograd(conv2d(x, w, None, 1, 1, algorithm="direct"))
    assert not _uses_winograd(conv2d(x, w, None, 2, 1))  # stride 2
    assert not _uses_winograd(conv2d(x, w[:, :, :1, :1], None, 1, 0))  # 1x1
    assert not _uses_winograd(conv2d(x.double(), w.double(), None, 1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _uses_winograd(conv2d(x, w, None, 1, 1))


def test_forced_winograd_takes_every_3x3_stride_1_convolution_and_leaves_the_rest():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3)
    assert _uses_winograd(conv2d(x, w, None, 1, 1, algorithm="winograd"))
    assert not _uses_winograd(conv2d(x, w, None, 2, 1, algorithm="winograd"))
    assert not _uses_winograd(conv2d(x, w[:, :, :1, :1], None, 1, 0, algorithm="winograd"))
    with pytest.raises(ValueError, match="algorithm"):
        conv2d(x, w, None, 1, 1, algorithm="fft")


def test_conv2d_module_has_nn_conv2d_parameters_and_follows_its_algorithm():
    torch.manual_seed(0)
    m = Conv2d(8, 8, 3, padding=1)
    ref = torch.nn.Conv2d(8, 8, 3, padding=1)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 8, 12, 12)
    m.algorithm = "winograd"
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)
    m.algorithm = "direct"
    assert torch.equal(m(x), ref(x))


def test_model_with_winograd_equals_direct_in_loss_gradients_and_detections():
    # both float32 algorithms against the float64 result: Winograd is as accurate as torch's convolution, give or
    # take a small factor, on any CPU
    torch.manual_seed(0)
    common = dict(num_classes=3, min_size=64, max_size=64, backbone_weights=None)
    direct = build_model("retinanet_r18_fpn", conv_algorithm="direct", **common)
    wino = build_model("retinanet_r18_fpn", conv_algorithm="winograd", **common)
    wino.load_state_dict(direct.state_dict())
    torch.nn.init.zeros_(direct.head.cls_logits.bias), torch.nn.init.zeros_(wino.head.cls_logits.bias)
    exact = float64_copy(direct)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6, 40, 50]]), "labels": torch.tensor([1])}] * 2
    results = []
    for model, ims in ((direct, images), (wino, images), (exact, [im.double() for im in images])):
        losses = model.loss(ims, targets)
        sum(losses.values()).backward()
        results.append(
            [*losses.values(), model.head.cls_tower[0].weight.grad, model.backbone.layer3[1].conv1.weight.grad]
        )
    for name, d, w, ref in zip(["loss_cls", "loss_box", "head grad", "backbone grad"], *results):
        assert_as_accurate(w, d, ref, what=name)
    direct.eval(), wino.eval()
    with torch.no_grad():
        d_ref, d_win = direct.predict(images), wino.predict(images)
    for a, b in zip(d_win, d_ref):
        assert len(b.scores) > 0
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-4, atol=1e-3)
        assert torch.equal(a.labels, b.labels)


def test_conv_algorithm_setting():
    model = build_model("retinanet_tiny", num_classes=2)
    assert model.config.conv_algorithm == "auto"
    model.use_conv_algorithm("direct")
    assert model.backbone.conv_algorithm == "direct" and model.head.cls_logits.algorithm == "direct"
    with pytest.raises(ValueError, match="conv_algorithm"):
        model.use_conv_algorithm("fft")


def test_forced_winograd_leaves_autocast_and_half_precision_to_torch():
    # Winograd's transforms in bf16 lose too much: the forced setting computes those with torch's convolution
    torch.manual_seed(0)
    x = torch.randn(1, 8, 12, 12, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv2d(x, w, None, 1, 1, algorithm="winograd")
    assert not _uses_winograd(y) and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and w.grad is not None
    assert not _uses_winograd(conv2d(x.bfloat16(), w.bfloat16(), None, 1, 1, algorithm="winograd"))
    with pytest.raises(ValueError, match="float32 or float64"):
        winograd_conv3x3(x.detach().half(), w.detach().half())


def test_model_with_forced_winograd_trains_under_bf16_autocast():
    model = build_model("retinanet_tiny", num_classes=2, conv_algorithm="winograd")
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6, 40, 50]]), "labels": torch.tensor([1])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_conv_algorithm_is_kept_in_the_config():
    model = build_model("retinanet_tiny", num_classes=2).use_conv_algorithm("direct")
    assert model.config.conv_algorithm == "direct"  # checkpoints rebuild the model from its config
