"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016), for the CPU.

A stride-1 3x3 convolution computes each 4x4 output tile from a 6x6 input tile. In the Winograd domain the
tile's 36 points are independent: the convolution becomes 36 matrix products [tiles, C_in] x [C_in, C_out],
2.25 multiplications per output instead of 9. On CPUs without bf16/int8 matrix units (oneDNN uses direct
convolution there) this is 1.5-3x faster for RetinaNet's 256-channel head and FPN convolutions at the P3/P4
sizes, forward and backward (measured on an AVX-512 Xeon and an AVX2 EPYC); on small maps it is slower. The
result is the same convolution up to float32 rounding (relative error about 1e-5 of the output's largest value,
against about 1e-6 for the direct algorithm); the data gradient is the same algorithm applied to the flipped
filters, the filter gradient is computed in the Winograd domain.

This module is the kernel alone: which convolutions it computes (`computes`) and how (`winograd_conv3x3`).
Which convolutions of a model it takes is the model's convolution dispatch (retinanet.model.conv), which asks the
machine's measured choice (retinanet.runtime.fastpath).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["computes", "winograd_conv3x3"]

TILE = 4  # output tile side m of F(m x m, 3 x 3)
_A = TILE + 2  # input tile side

# F(4, 3) with interpolation points 0, +-1, +-2, infinity: input transform B^T, filter transform G, output A^T
_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


@lru_cache(maxsize=None)
def _transforms(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The 2-D transforms as matrices on flattened tiles: input [36, 36], output [16, 36], filter [36, 9]."""

    def kron(m):
        t = torch.tensor(m, dtype=torch.float64)
        return torch.kron(t, t).to(dtype=dtype, device=device)

    with torch.inference_mode(False):  # plain tensors even if first asked for under inference_mode
        return kron(_BT), kron(_AT), kron(_G)


def computes(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
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


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for a [K, C, 3, 3] weight, by Winograd F(4x4, 3x3), differentiable.
    float32 or float64 (in lower precision the transforms lose too much). The output is channels-last."""
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(
            "winograd_conv3x3 needs x [N, C, H, W] and weight [K, C, 3, 3], "
            f"got {tuple(x.shape)}, {tuple(weight.shape)}"
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
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the data gradient of a convolution is the convolution of the output gradient with the filters flipped
            # and their in/out channels swapped: the same algorithm
            grad_x = _forward(grad_out, weight.flip(2, 3).transpose(0, 1), None)
        if ctx.needs_input_grad[1]:
            grad_w = _filter_grad(x, grad_out)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


# Tiles are processed in bands of tile rows whose Winograd-domain values (36 per tile and channel) take about
# BAND_BYTES, so that a band's transforms and products stay in the CPU's caches instead of streaming every
# intermediate through memory (measured on a 2-core AVX2 EPYC: forward and backward of a 256-channel 3x3
# convolution on a 100 x 136 map 1.5x faster than whole-map passes; the same speed on small maps).
BAND_BYTES = 4 << 20


def _tiles(size: int) -> int:
    return -(-size // TILE)


def _band_rows(x: Tensor, tiles_w: int, channels: int) -> int:
    """Tile rows per band."""
    per_row = _A * _A * x.element_size() * channels * x.shape[0] * tiles_w
    return max(1, BAND_BYTES // per_row)


def _padded(x: Tensor, tiles_h: int, tiles_w: int) -> Tensor:
    """x zero-padded by 1 on the top and left, and on the bottom and right up to whole tiles plus 1."""
    h, w = x.shape[-2:]
    return F.pad(x, (1, tiles_w * TILE + 1 - w, 1, tiles_h * TILE + 1 - h))


def _band_input_tiles(padded: Tensor, row0: int, row1: int, b_in: Tensor) -> Tensor:
    """The overlapping 6x6 input tiles (stride 4) of tile rows row0..row1-1 in the Winograd domain, V = B^T d B:
    [36, N * rows * tiles_w, C]."""
    c = padded.shape[1]
    band = padded[:, :, TILE * row0 : TILE * row1 + 2]
    d = band.unfold(2, _A, TILE).unfold(3, _A, TILE).permute(4, 5, 0, 2, 3, 1).reshape(_A * _A, -1)
    return (b_in @ d).view(_A * _A, -1, c)


def _filter_tiles(weight: Tensor) -> Tensor:
    """The filters in the Winograd domain, U = G g G^T: [36, C, K]."""
    g_w = _transforms(weight.dtype, weight.device)[2]
    k, c = weight.shape[:2]
    return (g_w @ weight.reshape(k, c, 9).permute(2, 1, 0).reshape(9, c * k)).view(_A * _A, c, k)


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The convolution's output [N, K, H, W], channels-last, band by band: per band 36 products
    [tiles, C] x [C, K], then Y = A^T M A per 4x4 output tile."""
    b_in, a_out, _ = _transforms(x.dtype, x.device)
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = _tiles(h), _tiles(w)
    padded, u = _padded(x, th, tw), _filter_tiles(weight)
    out = torch.empty((n, k, th * TILE, tw * TILE), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    tiled = out.permute(0, 2, 3, 1).view(n, th, TILE, tw, TILE, k)
    rows = _band_rows(x, tw, max(c, k))
    for r0 in range(0, th, rows):
        r1 = min(th, r0 + rows)
        m = torch.bmm(_band_input_tiles(padded, r0, r1, b_in), u)  # [36, tiles, K]
        y = (a_out @ m.view(_A * _A, -1)).view(TILE, TILE, n, r1 - r0, tw, k).permute(2, 3, 0, 4, 1, 5)
        if bias is None:
            tiled[:, r0:r1].copy_(y)
        else:
            torch.add(y, bias.to(y.dtype), out=tiled[:, r0:r1])
    if th * TILE != h or tw * TILE != w:
        out = out[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
    return out


def _filter_grad(x: Tensor, grad_out: Tensor) -> Tensor:
    """The filter gradient [K, C, 3, 3] in the Winograd domain: grad_U[p] = sum over bands of V[p]^T grad_M[p] for
    each of the 36 points, with grad_M = A grad_Y A^T per 4x4 output tile, and grad_w = G^T grad_U G."""
    b_in, a_out, g_w = _transforms(x.dtype, x.device)
    n, c, h, w = x.shape
    k = grad_out.shape[1]
    th, tw = _tiles(h), _tiles(w)
    padded = _padded(x, th, tw)
    g = grad_out.permute(0, 2, 3, 1)
    if th * TILE != h or tw * TILE != w:
        g = F.pad(g, (0, 0, 0, tw * TILE - w, 0, th * TILE - h))
    grad_u = x.new_zeros((_A * _A, c, k))
    rows = _band_rows(x, tw, max(c, k))
    for r0 in range(0, th, rows):
        r1 = min(th, r0 + rows)
        v = _band_input_tiles(padded, r0, r1, b_in)
        band = g[:, TILE * r0 : TILE * r1].reshape(n, r1 - r0, TILE, tw, TILE, k)
        grad_m = (a_out.t() @ band.permute(2, 4, 0, 1, 3, 5).reshape(TILE * TILE, -1)).view(_A * _A, -1, k)
        grad_u.baddbmm_(v.transpose(1, 2), grad_m)
    return (g_w.t() @ grad_u.view(_A * _A, -1)).view(3, 3, c, k).permute(3, 2, 0, 1)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
