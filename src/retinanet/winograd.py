"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016), for the CPU.

A stride-1 3x3 convolution computes each 4x4 output tile from a 6x6 input tile. In the Winograd domain the
tile's 36 points are independent: the convolution becomes 36 matrix products [tiles, C_in] x [C_in, C_out],
2.25 multiplications per output instead of 9. On CPUs without bf16/int8 matrix units (oneDNN uses direct
convolution there) this is about 1.7-1.9x faster for RetinaNet's 256-channel head and FPN convolutions at the
P3/P4 sizes, forward and backward. The result is the same convolution up to float32 rounding (relative error about
1e-5 of the output's largest value, against about 1e-6 for the direct algorithm); the data gradient is the same
algorithm applied to the flipped filters, the filter gradient is computed in the Winograd domain.

`conv2d` picks the algorithm per call: Winograd where it pays (see `winograd_applies`), else `F.conv2d`.
`Conv2d` is `nn.Conv2d` with that choice (same parameters and state-dict keys).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ALGORITHMS", "Conv2d", "conv2d", "winograd_applies", "winograd_conv3x3"]

ALGORITHMS = ("auto", "direct", "winograd")
TILE = 4  # output tile side m of F(m x m, 3 x 3)
_A = TILE + 2  # input tile side

# F(4, 3) with interpolation points 0, +-1, +-2, infinity: input transform B^T, filter transform G, output A^T
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))  # fmt: skip
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))  # fmt: skip
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))

# "auto" uses Winograd from these sizes on (measured on a 2-core AVX-512 Xeon: below them the transforms cost more
# than the multiplications saved)
MIN_CHANNELS = 128
MIN_POSITIONS = 32 * 32


@lru_cache(maxsize=None)
def _transforms(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The 2-D transforms as matrices on flattened tiles: input [36, 36], output [16, 36], filter [36, 9]."""

    def kron(m):
        t = torch.tensor(m, dtype=torch.float64)
        return torch.kron(t, t).to(dtype=dtype, device=device)

    with torch.inference_mode(False):  # plain tensors even if first asked for under inference_mode
        return kron(_BT), kron(_AT), kron(_G)


def _computable(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    """What the algorithm computes: a 4-D float32/float64 input outside autocast and a 3x3 filter of its dtype with
    stride 1, padding 1, no dilation or groups."""
    return (
        x.dim() == 4
        and weight.dim() == 4
        and tuple(weight.shape[-2:]) == (3, 3)
        and _pair(stride) == (1, 1)
        and _pair(padding) == (1, 1)
        and _pair(dilation) == (1, 1)
        and groups == 1
        and x.dtype in (torch.float32, torch.float64)
        and weight.dtype == x.dtype
        and not torch.is_autocast_enabled(x.device.type)
    )


def winograd_applies(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether "auto" uses Winograd: a float32 CPU tensor outside autocast, a 3x3 filter with stride 1, padding 1,
    no dilation or groups, at least MIN_CHANNELS channels in and out and MIN_POSITIONS output positions."""
    return (
        x.device.type == "cpu"  # first: autocast is asked about the device type only then
        and x.dtype == torch.float32
        and _computable(x, weight, stride, padding, dilation, groups)
        and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS
        and x.shape[-2] * x.shape[-1] >= MIN_POSITIONS
    )


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    algorithm: str = "auto",
) -> Tensor:
    """`F.conv2d`, computed by Winograd F(4x4, 3x3) for a 3x3 convolution with stride 1 and padding 1 when
    `algorithm` is "winograd", or "auto" and `winograd_applies`; otherwise (and always for "direct") `F.conv2d`."""
    if _use_winograd(x, weight, stride, padding, dilation, groups, algorithm):
        return winograd_conv3x3(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _use_winograd(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, algorithm: str) -> bool:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"conv algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "winograd":  # every convolution the algorithm computes
        return _computable(x, weight, stride, padding, dilation, groups)
    return algorithm == "auto" and winograd_applies(x, weight, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` whose forward is `conv2d(..., algorithm=self.algorithm)` (zero padding only)."""

    algorithm: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.algorithm)


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for a [K, C, 3, 3] weight, by Winograd F(4x4, 3x3), differentiable.
    float32 or float64 (in lower precision the transforms lose too much). The output is channels-last."""
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"winograd_conv3x3 needs x [N, C, H, W] and weight [K, C, 3, 3], got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise ValueError(f"winograd_conv3x3 computes float32 or float64, got {x.dtype} input, {weight.dtype} weight")
    return _WinogradConv3x3.apply(x, weight, bias)


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = _forward(x, weight, bias)
        # the input, not its Winograd-domain tiles (2.25x larger): they are recomputed for the filter gradient
        ctx.save_for_backward(x, weight)
        ctx.x_shape, ctx.has_bias = tuple(x.shape), bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        n, c, h, w = ctx.x_shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the data gradient of a convolution is the convolution of the output gradient with the filters flipped
            # and their in/out channels swapped: the same algorithm
            grad_x = _forward(grad_out, weight.flip(2, 3).transpose(0, 1), None)
        if ctx.needs_input_grad[1]:
            # the filter gradient in the Winograd domain: grad_U[p] = V[p]^T grad_M[p] for each of the 36 points,
            # with grad_M = A grad_Y A^T per 4x4 output tile and grad_w = G^T grad_U G
            _, a_out, g_w = _transforms(grad_out.dtype, grad_out.device)
            k = grad_out.shape[1]
            th, tw = _tiles(h), _tiles(w)
            g = grad_out.permute(0, 2, 3, 1)
            if th * TILE != h or tw * TILE != w:
                g = F.pad(g, (0, 0, 0, tw * TILE - w, 0, th * TILE - h))
            g = g.reshape(n, th, TILE, tw, TILE, k).permute(2, 4, 0, 1, 3, 5).reshape(TILE * TILE, -1)
            grad_m = (a_out.t() @ g).view(_A * _A, n * th * tw, k)
            grad_u = torch.bmm(_input_tiles(x).transpose(1, 2), grad_m)  # [36, C, K]
            grad_w = (g_w.t() @ grad_u.view(_A * _A, -1)).view(3, 3, c, k).permute(3, 2, 0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def _tiles(size: int) -> int:
    return -(-size // TILE)


def _input_tiles(x: Tensor) -> Tensor:
    """The input's overlapping 6x6 tiles (stride 4) of the zero-padded input in the Winograd domain,
    V = B^T d B: [36, N * tiles_h * tiles_w, C]."""
    b_in = _transforms(x.dtype, x.device)[0]
    n, c, h, w = x.shape
    th, tw = _tiles(h), _tiles(w)
    padded = F.pad(x, (1, tw * TILE + 1 - w, 1, th * TILE + 1 - h))
    d = padded.unfold(2, _A, TILE).unfold(3, _A, TILE).permute(4, 5, 0, 2, 3, 1).reshape(_A * _A, -1)
    return (b_in @ d).view(_A * _A, n * th * tw, c)


def _filter_tiles(weight: Tensor) -> Tensor:
    """The filters in the Winograd domain, U = G g G^T: [36, C, K]."""
    g_w = _transforms(weight.dtype, weight.device)[2]
    k, c = weight.shape[:2]
    return (g_w @ weight.reshape(k, c, 9).permute(2, 1, 0).reshape(9, c * k)).view(_A * _A, c, k)


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The convolution's output [N, K, H, W], channels-last."""
    a_out = _transforms(x.dtype, x.device)[1]
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = _tiles(h), _tiles(w)
    m = torch.bmm(_input_tiles(x), _filter_tiles(weight))  # [36, tiles, K]
    y = (a_out @ m.view(_A * _A, -1)).view(TILE, TILE, n, th, tw, k).permute(2, 3, 0, 4, 1, 5)  # A^T M A
    out = torch.empty((n, k, th * TILE, tw * TILE), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    tiled = out.permute(0, 2, 3, 1).view(n, th, TILE, tw, TILE, k)
    if bias is None:
        tiled.copy_(y)
    else:
        torch.add(y, bias.to(y.dtype), out=tiled)
    if th * TILE != h or tw * TILE != w:
        out = out[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
    return out


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
