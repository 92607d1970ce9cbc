"""The classification and box subnets, shared across pyramid levels, with the prior-probability initialisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from retinanet.model.conv import Conv2d

__all__ = ["RetinaNetHead"]


def _tower(in_channels: int, channels: int, num_convs: int, norm: str | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        conv = Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=norm is None)
        layers.append(conv)
        if norm == "gn":
            layers.append(nn.GroupNorm(32, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RetinaNetHead(nn.Module):
    """Two subnets applied to every level: num_convs x (3x3 conv, C channels, [GroupNorm], ReLU), then a 3x3 conv to
    K*A class logits or 4*A box deltas. New convs ~ N(0, 0.01), bias 0; the class bias is -log((1 - pi) / pi) so
    every anchor starts with foreground confidence pi (the paper's prior, 0.01)."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 4,
        norm: str | None = None,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if norm not in (None, "gn"):
            raise ValueError(f"head norm must be None or 'gn', got {norm!r}")
        if norm == "gn" and channels % 32:
            raise ValueError(f"head_norm 'gn' uses 32 groups: head_channels must be a multiple of 32, got {channels}")
        if not 0 < prior_prob < 1:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.cls_tower = _tower(in_channels, channels, num_convs, norm)
        self.box_tower = _tower(in_channels, channels, num_convs, norm)
        self.cls_logits = Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.box_deltas = Conv2d(channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features_per_level: list[Tensor]) -> tuple[Tensor, Tensor]:
        """features_per_level: [B, C, H_l, W_l] for each level ->
        cls_logits [B, sum_l(H_l W_l A), K] and box_deltas [B, sum_l(H_l W_l A), 4], ordered level, then location
        (row-major), then anchor type: the order of `AnchorGenerator`."""
        cls, box = zip(*(self.level_outputs(f) for f in features_per_level))
        return torch.cat(cls, 1), torch.cat(box, 1)

    def level_outputs(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """One level's outputs: feature [B, C, H, W] -> cls_logits [B, H W A, K], box_deltas [B, H W A, 4]."""
        cls = _flatten(self.cls_logits(self.cls_tower(feature)), self.num_classes)
        return cls, _flatten(self.box_deltas(self.box_tower(feature)), 4)


def _flatten(x: Tensor, per_anchor: int) -> Tensor:
    """[B, A * n, H, W] (channel = a * n + j) -> [B, H * W * A, n]."""
    b, _, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w * (x.shape[1] // per_anchor), per_anchor)
