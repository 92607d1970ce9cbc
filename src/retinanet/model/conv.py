"""The model's convolutions: `Conv2d` is `nn.Conv2d` (same parameters and state-dict keys) whose 3x3 stride-1
convolutions may run as Winograd F(4x4, 3x3) (retinanet.ops.winograd).

Per call, `conv2d` takes "direct" (torch's `F.conv2d`), "winograd" (every convolution the kernel computes) or
"auto": Winograd where the measured choice for the shape class says it is faster, torch's otherwise. The choices are
the model's own state (`Conv2d.fast_paths`, its training run's `RunFastPaths`, set by `RetinaNet.use_fast_paths`),
else the machine's cache (retinanet.runtime.fastpath measures once per machine and shape class): two models with
different choices run side by side in one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retinanet.ops.winograd import computes, winograd_conv3x3
from retinanet.runtime import fastpath
from retinanet.runtime.fastpath import RunFastPaths

__all__ = ["ALGORITHMS", "Conv2d", "conv2d", "winograd_applies"]

ALGORITHMS = ("auto", "direct", "winograd")


def winograd_applies(
    x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, fast_paths: RunFastPaths | None = None
) -> bool:
    """Whether "auto" uses Winograd: for a float32 CPU tensor outside autocast and a 3x3 filter with stride 1,
    padding 1, no dilation or groups, where it is measured faster on this machine for this shape class
    (`retinanet.runtime.fastpath.conv3x3_algorithm`)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32):  # first: autocast is asked about the device then
        return False
    if not computes(x, weight, stride, padding, dilation, groups):
        return False
    return fastpath.conv3x3_algorithm(x, weight, winograd_conv3x3, fast_paths) == "winograd"


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    algorithm: str = "auto",
    fast_paths: RunFastPaths | None = None,
) -> Tensor:
    """`F.conv2d`, computed by Winograd F(4x4, 3x3) for a 3x3 convolution with stride 1 and padding 1 when
    `algorithm` is "winograd", or "auto" and `winograd_applies` (by `fast_paths`' choices, else the machine's);
    otherwise (and always for "direct") `F.conv2d`."""
    if _use_winograd(x, weight, stride, padding, dilation, groups, algorithm, fast_paths):
        return winograd_conv3x3(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _use_winograd(
    x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, algorithm: str, fast_paths: RunFastPaths | None
) -> bool:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"conv algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "winograd":  # every convolution the algorithm computes
        return computes(x, weight, stride, padding, dilation, groups)
    return algorithm == "auto" and winograd_applies(x, weight, stride, padding, dilation, groups, fast_paths)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` whose forward is `conv2d(..., algorithm=self.algorithm, fast_paths=self.fast_paths)` (zero
    padding only)."""

    algorithm: str = "auto"
    fast_paths: RunFastPaths | None = None  # the model's (RetinaNet.use_fast_paths)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv2d(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.algorithm,
            self.fast_paths,
        )
