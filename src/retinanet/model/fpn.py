"""Feature pyramid P3..P7 on top of C3..C5 (FPN, with RetinaNet's P6/P7)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from retinanet.model.conv import Conv2d

__all__ = ["FPN"]


class FPN(nn.Module):
    """P3..P5 from C3..C5 (lateral 1x1, top-down nearest upsampling and sum, 3x3 output conv); P6 = 3x3 stride-2
    conv on C5 (the paper) or on P5 (torchvision v1); P7 = 3x3 stride-2 conv on ReLU(P6)."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int = 256, p6_from: Literal["c5", "p5"] = "c5"):
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' or 'p5', got {p6_from!r}")
        self.p6_from = p6_from
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.p6 = nn.Conv2d(in_channels[-1] if p6_from == "c5" else out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)  # "Xavier" fill of Detectron/detectron2
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: [C3, C4, C5] -> [P3, P4, P5, P6, P7], each [B, out_channels, H_l, W_l]."""
        laterals = [conv(c) for conv, c in zip(self.lateral, features)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            up = F.interpolate(merged[0], size=lateral.shape[-2:], mode="nearest")
            merged.insert(0, lateral + up)
        outs = [conv(m) for conv, m in zip(self.output, merged)]
        p6 = self.p6(features[-1] if self.p6_from == "c5" else outs[-1])
        p7 = self.p7(F.relu(p6))
        return outs + [p6, p7]
