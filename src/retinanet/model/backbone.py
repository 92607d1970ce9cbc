"""ResNet / ResNeXt bodies from torchvision that return C3, C4, C5, with frozen BatchNorm and stage freezing."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.model.conv import conv2d
from retinanet.runtime.downloads import fetch_state_dict

__all__ = ["ResNetBody", "build_backbone", "BACKBONES"]


def _resnet10(**kwargs) -> ResNet:
    """torchvision's ResNet with one BasicBlock per stage: the small preset's body (no published weights)."""
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


# name -> (constructor, torchvision weights enum for "imagenet" or None, (C3, C4, C5) channels)
BACKBONES: dict[str, tuple[Callable[..., ResNet], object, tuple[int, int, int]]] = {
    "resnet10": (_resnet10, None, (128, 256, 512)),
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, (128, 256, 512)),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, (128, 256, 512)),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, (512, 1024, 2048)),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1, (512, 1024, 2048)),
    "resnet152": (torchvision.models.resnet152, torchvision.models.ResNet152_Weights.IMAGENET1K_V1, (512, 1024, 2048)),
    "resnext101_32x8d": (
        torchvision.models.resnext101_32x8d,
        torchvision.models.ResNeXt101_32X8D_Weights.IMAGENET1K_V1,
        (512, 1024, 2048),
    ),
}


class ResNetBody(nn.Module):
    """The stem and four stages of a torchvision ResNet; `forward` returns [C3, C4, C5] (strides 8, 16, 32).

    Submodule names are torchvision's (conv1, bn1, layer1..layer4), so its state dicts load unchanged."""

    def __init__(self, resnet: ResNet, out_channels: tuple[int, int, int], fold_frozen_bn: bool = True):
        super().__init__()
        self.fold_frozen_bn = fold_frozen_bn
        self.conv_algorithm = "auto"  # of the folded convolutions: see retinanet.model.conv.conv2d
        self.fast_paths: Any = None  # the model's measured choices for them (RetinaNet.use_fast_paths)
        self.freeze_at = 0  # set by freeze()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] normalised images -> [C3 [B, c3, H/8, W/8], C4 [.., H/16, ..], C5 [.., H/32, ..]]."""
        if not (self.fold_frozen_bn and isinstance(self.bn1, FrozenBatchNorm2d)):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            c2 = self.layer1(x)
            c3 = self.layer2(c2)
            c4 = self.layer3(c3)
            return [c3, c4, self.layer4(c4)]
        # frozen BatchNorm is a fixed per-channel affine map: folded into the preceding convolution's weight and
        # bias it costs nothing, where applied after it it is two more passes over every activation (and their
        # backward). Same function, same parameters and state-dict keys.
        algorithm, fast = self.conv_algorithm, self.fast_paths
        x = self.maxpool(F.relu_(_conv_bn(x, self.conv1, self.bn1, algorithm, fast)))
        feats = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = _folded_block(block, x, algorithm, fast)
            feats.append(x)
        return feats[1:]

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients of the stem (freeze_at >= 1) and of stages layer1 .. layer{freeze_at - 1}.

        freeze_at = 0 trains everything; 2 (Detectron's default) freezes the stem and layer1; 5 freezes all."""
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        self.freeze_at = freeze_at
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        stages = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        return [m for stage in stages[: self.freeze_at] for m in stage]

    def train(self, mode: bool = True) -> "ResNetBody":
        """As nn.Module.train, except that trainable BatchNorm layers (norm="bn") of frozen stages stay in eval mode:
        a frozen stage changes neither its weights nor its running statistics."""
        super().train(mode)
        for module in self._frozen_modules():
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        for m in self.modules():
            m.__dict__.pop("_retinanet_affine", None)  # see _frozen_bn_affine
        return self


def _conv_bn(
    x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d, algorithm: str = "auto", fast_paths: Any = None
) -> Tensor:
    """bn(conv(x)) as one convolution: weight * scale, bias = bn.bias - running_mean * scale (fast_paths: the model's
    measured choices, retinanet.model.conv.conv2d)."""
    scale, bias = _frozen_bn_affine(bn)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, algorithm, fast_paths)


def _frozen_bn_affine(bn: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale, shift) of a frozen BatchNorm: four fewer kernels per convolution and call, which is what limits a GPU
    at small batches. Cached on the module until one of its buffers changes by an in-place operation or is replaced
    (loading weights, moving devices), and dropped whenever the model's train()/eval() is called; a write through
    `.data` is not seen until then."""
    buffers = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or any(t.is_inference() for t in buffers):
        return _affine(bn)  # inference tensors have no version counter, and a cached one could not be trained through
    key = tuple((t.data_ptr(), t._version) for t in buffers) + (bn.eps,)
    cached = getattr(bn, "_retinanet_affine", None)
    if cached is None or cached[0] != key:
        cached = (key, _affine(bn))
        bn._retinanet_affine = cached
    return cached[1]


def _affine(bn: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


def _folded_block(block: nn.Module, x: Tensor, algorithm: str = "auto", fast: Any = None) -> Tensor:
    """torchvision's BasicBlock / Bottleneck forward with every (conv, frozen BN) pair folded. ReLU and the residual
    sum work in place on fresh convolution outputs (a convolution's backward does not read its output)."""
    down = block.downsample
    identity = x if down is None else _conv_bn(x, down[0], down[1], algorithm, fast)
    out = F.relu_(_conv_bn(x, block.conv1, block.bn1, algorithm, fast))
    if isinstance(block, BasicBlock):
        out = _conv_bn(out, block.conv2, block.bn2, algorithm, fast)
    else:
        out = F.relu_(_conv_bn(out, block.conv2, block.bn2, algorithm, fast))
        out = _conv_bn(out, block.conv3, block.bn3, algorithm, fast)
    return F.relu_(out.add_(identity))


def _load_local_weights(resnet: ResNet, path: str | Path) -> None:
    """A torchvision-layout ResNet state dict (the `fc.*` classifier keys, if present, are not needed)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"backbone weights file {path} is not a readable PyTorch state dict: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights file {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"backbone weights {path} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _with_width(resnet: ResNet, width: int) -> ResNet:
    """The same architecture with `width` channels in the stem and the first stage, doubling per stage (torchvision
    builds 64): a narrower network for training from scratch on small data, or on a small budget. Initialised as
    torchvision initialises its ResNets."""
    block = type(resnet.layer1[0])
    depths = [len(stage) for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)]
    resnet.inplanes, resnet.dilation = width, 1
    resnet.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    resnet.bn1 = resnet._norm_layer(width)
    for i, depth in enumerate(depths):
        setattr(resnet, f"layer{i + 1}", resnet._make_layer(block, width * 2**i, depth, stride=1 if i == 0 else 2))
    resnet.fc = nn.Linear(width * 8 * block.expansion, resnet.fc.out_features)
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return resnet


def build_backbone(
    name: str = "resnet50",
    weights: str | None = None,
    norm: str = "frozen_bn",
    frozen_bn_eps: float = 1e-5,
    freeze_at: int = 2,
    fold_frozen_bn: bool = True,
    width: int | None = None,
) -> ResNetBody:
    """A ResNet body.

    Args:
        name: one of BACKBONES (resnet10/18/34/50/101/152, resnext101_32x8d).
        weights: None (random init), "imagenet" (torchvision's ImageNet weights, downloaded by torchvision's own
            mechanism: needs a connection the first time) or the path of a local torchvision-layout state dict.
        norm: "frozen_bn" (the paper's fixed BatchNorm statistics and affine) or "bn" (trainable BatchNorm).
        frozen_bn_eps: eps of the frozen BatchNorm (torchvision's published RetinaNet v1 weights use 0).
        freeze_at: see `ResNetBody.freeze`.
        fold_frozen_bn: compute each (conv, frozen BN) pair as one convolution (see `ResNetBody.forward`).
        width: channels of the stem and first stage (doubling per stage); None: the architecture's 64. Only from
            scratch: published weights are for 64.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if norm not in ("frozen_bn", "bn"):
        raise ValueError(f"norm must be 'frozen_bn' or 'bn', got {norm!r}")
    ctor, imagenet, channels = BACKBONES[name]
    norm_layer = partial(FrozenBatchNorm2d, eps=frozen_bn_eps) if norm == "frozen_bn" else nn.BatchNorm2d
    if weights == "imagenet" and imagenet is None:
        raise ValueError(f"no published ImageNet weights for {name}")
    resnet = ctor(weights=None, norm_layer=norm_layer) if name != "resnet10" else ctor(norm_layer=norm_layer)
    if width not in (None, 64):
        if weights not in (None, "none"):
            raise ValueError(f"backbone_width {width}: pretrained {name} weights exist for width 64 only")
        resnet = _with_width(resnet, width)
        channels = tuple(c * width // 64 for c in channels)
    if weights == "imagenet":
        state = fetch_state_dict(
            imagenet, f"the ImageNet weights of {name}", "set model.backbone_weights to that file's path"
        )
        resnet.load_state_dict(state)
    elif weights not in (None, "none"):
        _load_local_weights(resnet, weights)
    body = ResNetBody(resnet, channels, fold_frozen_bn)
    body.freeze(freeze_at)
    return body
