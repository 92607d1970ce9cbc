"""Tolerances that hold on any CPU: float32 results are judged against a float64 reference.

Two float32 computations of the same function (folded against plain BatchNorm, Winograd against direct
convolution, AVX-512 against AVX2 kernels) round differently, and by how much depends on the machine's kernels.
What does not depend on the machine is how far each is from the exact result: a float32 path is accepted when its
error against the float64 reference is at most a few times that of torch's own float32 path, plus a floor of a few
float32 ulps of the values' magnitude.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

EPS32 = torch.finfo(torch.float32).eps


def float64_copy(module: nn.Module) -> nn.Module:
    """A float64 copy of `module` (parameters and buffers), for references."""
    return copy.deepcopy(module).double()


def max_error(actual: Tensor, reference: Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item() if reference.numel() else 0.0


def assert_as_accurate(
    actual: Tensor, baseline: Tensor, reference: Tensor, factor: float = 8.0, what: str = ""
) -> None:
    """`actual` is no further from the float64 `reference` than `factor` times the float32 `baseline` is, give or
    take 64 float32 ulps of the reference's largest magnitude."""
    assert actual.shape == reference.shape and baseline.shape == reference.shape, (actual.shape, reference.shape)
    err, base = max_error(actual, reference), max_error(baseline, reference)
    floor = 64 * EPS32 * (reference.double().abs().max().item() if reference.numel() else 0.0)
    assert err <= factor * base + floor, (
        f"{what}: error {err:.3g} against float64, torch's float32 path {base:.3g} "
        f"(allowed {factor} x that + {floor:.3g})"
    )


def assert_close_to_reference(actual: Tensor, reference: Tensor, ulps: float = 1024.0, what: str = "") -> None:
    """`actual` (float32) is within `ulps` float32 ulps of the float64 `reference`'s largest magnitude."""
    err = max_error(actual, reference)
    allowed = ulps * EPS32 * (reference.double().abs().max().item() if reference.numel() else 0.0)
    assert err <= allowed, f"{what}: error {err:.3g} against float64, allowed {allowed:.3g} ({ulps:g} ulps)"
