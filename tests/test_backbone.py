import pytest
import torch
import torchvision
from numerics import assert_as_accurate, float64_copy
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.model.backbone import BACKBONES, ResNetBody, build_backbone


def _norms(body: nn.Module) -> list[nn.Module]:
    return [m for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_gives_c3_c4_c5_with_declared_channels(name):
    # on the meta device: the full architecture and its shapes, without the cost of initialising 90M weights
    with torch.device("meta"):
        body = build_backbone(name, weights=None)
        feats = body(torch.empty(2, 3, 64, 96))
    assert isinstance(body, ResNetBody) and len(feats) == 3
    for f, c, stride in zip(feats, body.out_channels, (8, 16, 32)):
        assert tuple(f.shape) == (2, c, 64 // stride, 96 // stride)


@pytest.mark.parametrize("name", ["resnet10", "resnet18"])
def test_small_backbones_run_for_real(name):
    body = build_backbone(name, weights=None).eval()
    with torch.no_grad():
        feats = body(torch.rand(1, 3, 64, 96))
    for f, c, stride in zip(feats, body.out_channels, (8, 16, 32)):
        assert tuple(f.shape) == (1, c, 64 // stride, 96 // stride)
        assert torch.isfinite(f).all()


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_frozen_bn_is_torchvisions_with_the_given_eps(eps):
    body = build_backbone("resnet18", norm="frozen_bn", frozen_bn_eps=eps)
    norms = _norms(body)
    assert norms and all(type(m) is FrozenBatchNorm2d for m in norms)
    assert all(m.eps == eps for m in norms)
    assert not any(isinstance(p, nn.Parameter) and p.requires_grad for m in norms for p in m.parameters())


def test_bn_norm_is_trainable_batchnorm():
    body = build_backbone("resnet10", norm="bn", freeze_at=0)
    norms = _norms(body)
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)


def _trainable(module: nn.Module) -> set[bool]:
    return {p.requires_grad for p in module.parameters()}


def test_freeze_at_2_freezes_stem_and_layer1_only():
    body = build_backbone("resnet18", norm="bn", freeze_at=2)
    assert _trainable(body.conv1) == _trainable(body.bn1) == _trainable(body.layer1) == {False}
    for layer in (body.layer2, body.layer3, body.layer4):
        assert _trainable(layer) == {True}


def test_freeze_at_1_freezes_only_the_stem():
    body = build_backbone("resnet18", norm="bn", freeze_at=1)
    assert _trainable(body.conv1) == _trainable(body.bn1) == {False}
    assert _trainable(body.layer1) == {True}


def test_freeze_at_0_trains_everything_and_5_nothing():
    assert _trainable(build_backbone("resnet18", norm="bn", freeze_at=0)) == {True}
    assert _trainable(build_backbone("resnet18", norm="bn", freeze_at=5)) == {False}


def test_freeze_at_out_of_range_raises():
    with pytest.raises(ValueError, match="freeze_at"):
        build_backbone("resnet10", freeze_at=6)


def test_unknown_backbone_and_norm_raise():
    with pytest.raises(ValueError, match="resnet9"):
        build_backbone("resnet9")
    with pytest.raises(ValueError, match="groupnorm"):
        build_backbone("resnet18", norm="groupnorm")
    with pytest.raises(ValueError, match="resnet10"):
        build_backbone("resnet10", weights="imagenet")


def _random_resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    # random BN statistics and affine too, so that loading them is checked, not their defaults
    return {k: (torch.rand_like(v) + 0.5 if v.is_floating_point() else v) for k, v in state.items()}


@pytest.mark.parametrize(
    ("wrap", "norm"), [("plain", "frozen_bn"), ("plain", "bn"), ("model", "frozen_bn"), ("module_prefix", "frozen_bn")]
)
def test_local_weights_file_loads_and_equals(tmp_path, wrap, norm):
    state = _random_resnet18_state()
    assert any(k.startswith("fc.") for k in state)
    saved = state
    if wrap == "model":
        saved = {"model": state}
    elif wrap == "module_prefix":
        saved = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "r18.pth"
    torch.save(saved, path)
    body = build_backbone("resnet18", weights=str(path), norm=norm, freeze_at=0)
    loaded = body.state_dict()
    checked = 0
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(loaded[k], v), k
        checked += 1
    assert checked == len([k for k in loaded if not k.endswith("num_batches_tracked")])


def test_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match="nope.pth"):
        build_backbone("resnet18", weights=str(path))


def test_corrupt_weights_file_names_the_path(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        build_backbone("resnet18", weights=str(path))


def test_weights_file_holding_no_dict_names_the_path(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="tensor.pth"):
        build_backbone("resnet18", weights=str(path))


def test_weights_of_another_architecture_name_the_path(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="r34.pth"):
        build_backbone("resnet18", weights=str(path))


def _plain_forward(body: ResNetBody, x: torch.Tensor) -> list[torch.Tensor]:
    """C3..C5 by torchvision's modules, BatchNorm applied after each convolution."""
    x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
    outs = []
    for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
        x = stage(x)
        outs.append(x)
    return outs[1:]


def test_frozen_bn_folding_equals_the_plain_forward():
    # the folded forward (frozen BN inside the convolutions) must be the same function as torchvision's modules:
    # as close to the float64 result as torchvision's own float32 forward is, on any CPU's kernels
    from retinanet.model.backbone import build_backbone as _build

    torch.manual_seed(0)
    for name in ("resnet18", "resnet50"):
        body = _build(name, norm="frozen_bn", freeze_at=0)
        for m in body.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        x = torch.randn(2, 3, 64, 96, requires_grad=True)
        folded = body(x)
        plain = _plain_forward(body, x)
        body64 = float64_copy(body)
        exact = _plain_forward(body64, x.detach().double())
        for level, (a, b, r) in enumerate(zip(folded, plain, exact)):
            assert_as_accurate(a, b, r, what=f"{name} C{level + 3}")
        g1 = torch.autograd.grad(sum(f.sum() for f in folded), body.layer2[0].conv1.weight)[0]
        g2 = torch.autograd.grad(sum(f.sum() for f in plain), body.layer2[0].conv1.weight)[0]
        g64 = torch.autograd.grad(sum(f.sum() for f in exact), body64.layer2[0].conv1.weight)[0]
        assert_as_accurate(g1, g2, g64, what=f"{name} gradient")


def test_folded_forward_follows_changes_of_the_frozen_statistics():
    # the folded BN affine is cached per module: changing the statistics in place (as loading weights does) must
    # show in the next forward
    from retinanet.model.backbone import build_backbone as _build

    torch.manual_seed(0)
    body = _build("resnet18", norm="frozen_bn", freeze_at=5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = body(x)[-1]
        for m in body.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
        after = body(x)[-1]
        body.fold_frozen_bn = False
        plain = body(x)[-1]
        exact = float64_copy(body)(x.double())[-1]
    assert not torch.allclose(before, after)
    assert_as_accurate(after, plain, exact)


def test_frozen_stages_keep_their_batchnorm_statistics_in_training():
    from retinanet import build_model

    model = build_model("retinanet_r18_fpn", num_classes=2, backbone_norm="bn", freeze_at=2)
    body = model.backbone
    frozen_before = body.layer1[0].bn1.running_mean.clone()
    trained_before = body.layer2[0].bn1.running_mean.clone()
    model.eval().train()  # the model's train() reaches the body's
    assert not body.bn1.training and not body.layer1[0].bn1.training and body.layer2[0].bn1.training
    body(torch.randn(2, 3, 64, 64))
    assert torch.equal(body.layer1[0].bn1.running_mean, frozen_before)
    assert not torch.equal(body.layer2[0].bn1.running_mean, trained_before)


def test_group_norm_head_needs_a_multiple_of_32_channels():
    from retinanet.model.head import RetinaNetHead

    with pytest.raises(ValueError, match="head_channels must be a multiple of 32, got 48"):
        RetinaNetHead(64, 9, 3, channels=48, norm="gn")


def _frozen_bn_body():
    torch.manual_seed(0)
    return build_backbone("resnet18", norm="frozen_bn", freeze_at=5)


def test_folded_statistics_cache_is_dropped_by_train_and_eval():
    # a write through .data bypasses the version counter: the cache is dropped at the next train()/eval()
    body = _frozen_bn_body().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        body(x)
        for m in body.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.data.mul_(4)
        body.eval()
        folded = body(x)[-1]
        body.fold_frozen_bn = False
        plain = body(x)[-1]
        exact = float64_copy(body)(x.double())[-1]
    assert_as_accurate(folded, plain, exact)


def test_folded_backbone_under_inference_mode():
    x = torch.randn(1, 3, 64, 64)
    body = _frozen_bn_body()
    with torch.inference_mode():
        first = body(x)[-1]  # the first forward under inference_mode must not leave cached inference tensors
    body.layer4[0].conv1.weight.requires_grad_(True)
    body(x)[-1].sum().backward()  # then training works
    assert body.layer4[0].conv1.weight.grad is not None
    with torch.inference_mode():
        built_inside = _frozen_bn_body()  # buffers that are inference tensors
        torch.testing.assert_close(built_inside(x)[-1], first)


def test_a_narrower_backbone_halves_every_stage(tmp_path):
    body = build_backbone("resnet18", norm="bn", freeze_at=0, width=32)
    assert body.out_channels == (64, 128, 256)
    feats = body(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 8, 12), (128, 4, 6), (256, 2, 3)]
    full = build_backbone("resnet18", norm="bn", freeze_at=0)
    ratio = sum(p.numel() for p in body.parameters()) / sum(p.numel() for p in full.parameters())
    assert 0.2 < ratio < 0.3  # a quarter of the weights: every convolution has half the channels in and out
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="width 64 only"):
        build_backbone("resnet18", weights=str(path), width=32)
