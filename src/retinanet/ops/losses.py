"""The focal-loss family of the paper (box regression losses: retinanet.ops.box_losses; OHEM: retinanet.ops.ohem).

Every classification loss here is a sigmoid loss over independent binary problems (one per anchor and class):

    p = sigmoid(x), p_t = p if y = 1 else 1 - p, alpha_t = alpha if y = 1 else 1 - alpha
    CE  = -log(p_t)                          (gamma = 0, alpha < 0)
    BCE = -alpha_t log(p_t)                   (balanced CE: gamma = 0, alpha >= 0)
    FL  = -alpha_t (1 - p_t)^gamma log(p_t)
    FL* = -alpha_t log(sigmoid(gamma x_t + beta)) / gamma, x_t = x if y = 1 else -x   (appendix A)

and its successors, whose positive target is a soft quality q in [0, 1] (the IoU of the predicted box with its
object), so that a score ranks boxes by how well they fit:

    QFL = -|q - p|^beta ((1 - q) log(1 - p) + q log(p))               (Generalized Focal Loss, Li et al. 2020)
    VFL = -q (q log(p) + (1 - q) log(1 - p))   if q > 0
          -alpha p^gamma log(1 - p)             if q = 0               (VarifocalNet, Zhang et al. 2021)

The losses are computed by one fused autograd Function whose backward is the closed form of appendix B: a summed
loss computes its gradient in the same pass as its value and keeps only that; an elementwise loss keeps only its
inputs and recomputes the gradient in the backward. The elementwise maths live in `_focal_terms`,
`_focal_star_terms`, `_quality_focal_terms` and `_varifocal_terms`; they run either through `torch.compile` (one fused
loop per pass) or eagerly in cache-sized chunks, and both give the same numbers. Half and bfloat16 inputs are computed
in float32.
"""

from __future__ import annotations

import os
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["none", "mean", "sum"]

__all__ = [
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
    "sigmoid_focal_loss_from_labels",
    "quality_focal_loss",
    "varifocal_loss",
    "binary_cross_entropy",
    "check_reduction",
    "compute_dtype",
    "set_loss_backend",
]

# --------------------------------------------------------------------------------------------------------------
# Elementwise maths. Each returns (loss, dloss/dx) for float32 logits x and float targets t in [0, 1].
# Written with softplus/sigmoid of +-x so that no log(0) or 1 - 1 cancellation occurs for logits up to +-1e4.


def _alpha_t(t: Tensor, alpha: float) -> Tensor | float:
    if alpha < 0:
        return 1.0
    return alpha * t + (1.0 - alpha) * (1.0 - t)


def _sigmoid_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(p, 1 - p, softplus(x)) with one exp per element: e = exp(-|x|) gives all three without cancellation or
    overflow. The binary cross entropy with logits against a target t is softplus(x) - x t."""
    e = torch.exp(-x.abs())
    r = 1.0 / (1.0 + e)
    pos = x >= 0
    p = torch.where(pos, r, e * r)
    q = torch.where(pos, e * r, r)
    return p, q, x.clamp_min(0) + torch.log1p(e)


def _power_and_slope(m: Tensor, power: float, need_slope: bool) -> tuple[Tensor, Tensor | None]:
    """(m^power, power m^(power - 1)) for m >= 0; the slope's limit 0 at m = 0 where power < 1 makes it infinite."""
    mg = m * m if power == 2 else m.pow(power)
    if not need_slope:
        return mg, None
    if power == 2:
        return mg, 2.0 * m
    if power >= 1:
        return mg, power * m.pow(power - 1)
    return mg, power * torch.where(m > 0, mg / m.clamp_min(torch.finfo(m.dtype).tiny), torch.zeros_like(m))


def _focal_terms(x: Tensor, t: Tensor, alpha: float, gamma: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    p, q, softplus = _sigmoid_parts(x)
    ce = softplus - x * t  # binary cross entropy with logits
    a = _alpha_t(t, alpha)
    if gamma == 0:
        return a * ce, (a * (p - t) if need_grad else None)
    m = t * q + (1.0 - t) * p  # 1 - p_t
    mg, slope = _power_and_slope(m, gamma, need_grad)
    loss = a * mg * ce
    if not need_grad:
        return loss, None
    # d(m^gamma)/dx = gamma m^(gamma - 1) (1 - 2t) p (1 - p)
    grad = a * (slope * (1.0 - 2.0 * t) * p * q * ce + mg * (p - t))
    return loss, grad


def _quality_focal_terms(x: Tensor, t: Tensor, beta: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    # QFL = |t - p|^beta CE(x, t): the focal factor is the distance to the soft target, not to 1
    p, q, softplus = _sigmoid_parts(x)
    ce = softplus - x * t
    d = p - t
    w, slope = _power_and_slope(d.abs(), beta, need_grad)
    loss = w * ce
    if not need_grad:
        return loss, None
    # d|p - t|^beta/dx = beta |p - t|^(beta - 1) sign(p - t) p (1 - p); dCE/dx = p - t
    return loss, slope * torch.sign(d) * p * q * ce + w * d


def _varifocal_terms(x: Tensor, t: Tensor, alpha: float, gamma: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    # VFL = w CE(x, t) with w = t for a positive (t > 0: weighted by its quality) and alpha p^gamma for a negative
    p, q, softplus = _sigmoid_parts(x)
    ce = softplus - x * t
    positive = t > 0
    pg, slope = _power_and_slope(p, gamma, need_grad)
    loss = torch.where(positive, t, alpha * pg) * ce
    if not need_grad:
        return loss, None
    # positive: t (p - t); negative (t = 0, CE = softplus(x)): alpha (gamma p^(gamma - 1) p (1 - p) CE + p^gamma p)
    return loss, torch.where(positive, t * (p - t), alpha * (slope * p * q * ce + pg * p))


def _focal_star_terms(
    x: Tensor, t: Tensor, alpha: float, gamma: float, beta: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    s = 2.0 * t - 1.0  # y in {-1, +1}
    z = gamma * s * x + beta
    a = _alpha_t(t, alpha)
    loss = a * F.softplus(-z) / gamma
    if not need_grad:
        return loss, None
    grad = a * s * -torch.sigmoid(-z)  # y (p*_t - 1)
    return loss, grad


# --------------------------------------------------------------------------------------------------------------
# Backends: how the elementwise maths are run over a whole tensor, fused with the reduction.


KINDS = ("focal", "focal_star", "quality_focal", "varifocal")


def _terms(kind: str, x: Tensor, t: Tensor, alpha: float, gamma: float, beta: float, need_grad: bool):
    if kind == "focal":
        return _focal_terms(x, t, alpha, gamma, need_grad)
    if kind == "focal_star":
        return _focal_star_terms(x, t, alpha, gamma, beta, need_grad)
    if kind == "quality_focal":
        return _quality_focal_terms(x, t, beta, need_grad)
    return _varifocal_terms(x, t, alpha, gamma, need_grad)


def _dense_targets(targets: Tensor, quality: Tensor | None, labels_mode: bool, num_classes: int) -> Tensor:
    """Dense targets, as given or from one class index per row (times its quality, if any).

    In labels mode `targets` is [N, 1] int64 (class index, negative = background, ignore = masked out) and
    `quality` None or [N, 1] float (the soft target of the row's class); the one-hot comparison is made on the fly,
    on a chunk at a time or inside the fused kernel, never over the whole tensor in the eager backend.
    """
    if not labels_mode:
        return targets
    onehot = targets == torch.arange(num_classes, device=targets.device)
    return onehot if quality is None else onehot * quality


def compute_dtype(x: Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32 and float64 in themselves."""
    return torch.promote_types(x.dtype, torch.float32)


def _kernel(
    kind: str,
    x: Tensor,
    targets: Tensor,
    quality: Tensor | None,
    mask: Tensor | None,
    labels_mode: bool,
    alpha: float,
    gamma: float,
    beta: float,
    reduce: bool,
    grad_scale: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Loss (elementwise, or summed if `reduce`) and, if `grad_scale` is given, dloss/dx times it, in x's dtype."""
    xc = x.to(compute_dtype(x))
    t = _dense_targets(targets, quality, labels_mode, x.shape[1]).to(xc.dtype)
    loss, grad = _terms(kind, xc, t, alpha, gamma, beta, need_grad=grad_scale is not None)
    if mask is not None:
        loss = loss * mask
        grad = grad * mask if grad is not None else None
    if grad is not None:
        grad = (grad * grad_scale).to(x.dtype)
    return (loss.sum() if reduce else loss), grad


_BACKEND = os.environ.get("RETINANET_LOSS_BACKEND", "auto")
_COMPILED: dict[str, Callable] = {}
_CHUNK = 1 << 17  # elements per eager chunk on a CPU: a few float32 buffers of this size stay in L2
_GPU_CHUNK = 1 << 21  # on a GPU: few launches per op, and the eager temporaries bounded to ~100 MB


def set_loss_backend(backend: Literal["auto", "compile", "eager"]) -> None:
    """Choose how the fused losses run: `compile` (torch.compile, one fused loop per pass), `eager` (chunked
    PyTorch ops) or `auto` (compiled for large CPU/CUDA inputs when a compiler works, else eager).
    Both give the same numbers to float32 rounding. Also settable with RETINANET_LOSS_BACKEND."""
    global _BACKEND
    if backend not in ("auto", "compile", "eager"):
        raise ValueError(f"loss backend must be 'auto', 'compile' or 'eager', got {backend!r}")
    _BACKEND = backend


def _use_compiled(x: Tensor) -> bool:
    if _BACKEND == "eager" or torch.compiler.is_compiling():
        return False
    if _BACKEND == "compile":
        return True
    return x.numel() >= (1 << 20) and _compile_works(x.device)


_COMPILE_OK: dict[str, bool] = {}


def _compile_works(device: torch.device = torch.device("cpu")) -> bool:
    """torch.compile needs a C++ compiler on the CPU and Triton on CUDA: try it once per device type, remember."""
    if device.type not in _COMPILE_OK:
        try:
            f = torch.compile(lambda a: torch.sigmoid(a).sum(), dynamic=True)
            f(torch.zeros(8, device=device))
            _COMPILE_OK[device.type] = True
        except Exception:  # noqa: BLE001 - any failure means: stay eager
            _COMPILE_OK[device.type] = False
    return _COMPILE_OK[device.type]


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def _run(x, targets, quality, mask, kind, labels_mode, alpha, gamma, beta, reduce, grad_scale):
    """`_kernel` over the whole [N, K] tensor: one compiled fused loop, or eager in row chunks of ~_CHUNK elements."""
    if _use_compiled(x):
        name = f"{kind}-{labels_mode}-{reduce}-{grad_scale is None}-{mask is None}-{quality is None}"
        fn = _compiled(name, _kernel)
        return fn(kind, x, targets, quality, mask, labels_mode, alpha, gamma, beta, reduce, grad_scale)
    want_grad = grad_scale is not None
    out = x.new_zeros((), dtype=compute_dtype(x)) if reduce else torch.empty_like(x)
    gx = torch.empty_like(x) if want_grad else None
    chunk = _CHUNK if x.device.type == "cpu" else _GPU_CHUNK
    step = max(1, chunk // max(x.shape[1], 1))
    for s in range(0, x.shape[0], step):
        rows = slice(s, s + step)
        scale = grad_scale if grad_scale is None or grad_scale.dim() == 0 else grad_scale[rows]
        m = None if mask is None else mask[rows]
        qr = None if quality is None else quality[rows]
        part, g = _kernel(kind, x[rows], targets[rows], qr, m, labels_mode, alpha, gamma, beta, reduce, scale)
        if reduce:
            out += part
        else:
            out[rows] = part
        if want_grad:
            gx[rows] = g
    return out, gx


class _FusedSigmoidLoss(torch.autograd.Function):
    """The elementwise loss ([N, K]) or its sum, with the closed-form gradient of appendix B.

    For a summed loss whose input needs a gradient, the forward computes the gradient in the same pass (one read of
    the logits, no intermediate kept) and the backward only scales it; otherwise the backward recomputes it from
    the saved inputs."""

    @staticmethod
    def forward(ctx, x, targets, quality, kind, labels_mode, mask, alpha, gamma, beta, reduce):  # type: ignore[override]
        ctx.save_for_backward(x, targets, quality, mask)
        ctx.cfg = (kind, labels_mode, alpha, gamma, beta)
        fuse_grad = reduce and x.requires_grad
        one = torch.ones((), dtype=compute_dtype(x), device=x.device) if fuse_grad else None
        out, ctx.grad = _run(x, targets, quality, mask, kind, labels_mode, alpha, gamma, beta, reduce, one)
        return out if reduce else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, targets, quality, mask = ctx.saved_tensors
        kind, labels_mode, alpha, gamma, beta = ctx.cfg
        grad_out = grad_out.to(compute_dtype(x))
        if ctx.grad is not None:
            gx, ctx.grad = ctx.grad, None  # used once; a second backward (retain_graph) recomputes
            gx = gx.mul_(grad_out.to(gx.dtype))
        else:
            _, gx = _run(x, targets, quality, mask, kind, labels_mode, alpha, gamma, beta, False, grad_out)
        return gx, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# Public classification losses.


def check_reduction(reduction: str) -> None:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _fused(
    kind: str, inputs: Tensor, targets: Tensor, alpha: float, gamma: float, beta: float, reduction: str
) -> Tensor:
    check_reduction(reduction)
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have the same shape")
    shape = inputs.shape
    row = shape[-1] if inputs.dim() > 0 else 1
    x = inputs.reshape(-1, row)
    t = targets.reshape(-1, row)
    if t.dtype == torch.bool:
        t = t.to(inputs.dtype)
    reduce = reduction != "none"
    out = _FusedSigmoidLoss.apply(x, t, None, kind, False, None, float(alpha), float(gamma), float(beta), reduce)
    if reduction == "none":
        return out.reshape(shape)
    if reduction == "mean":
        return out / max(inputs.numel(), 1)
    return out


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: Reduction = "none"
) -> Tensor:
    """Focal loss FL = -alpha_t (1 - p_t)^gamma log(p_t): a drop-in for `torchvision.ops.sigmoid_focal_loss`.

    Args:
        inputs: [*] float logits (any shape; float16/bfloat16 are computed in float32).
        targets: [*] float in [0, 1], same shape (1 = positive); soft targets are allowed as in torchvision.
        alpha: weight of the positives in [0, 1]; the negatives get 1 - alpha. alpha < 0 turns the weighting off.
        gamma: focusing parameter >= 0; gamma = 0 is (balanced, if alpha >= 0) binary cross entropy.
        reduction: "none" ([*], inputs' dtype), "mean" or "sum" (scalars, float32 for low-precision inputs).
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return _fused("focal", inputs, targets, alpha, gamma, 0.0, reduction)


def sigmoid_focal_loss_star(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    beta: float = 1.0,
    reduction: Reduction = "none",
) -> Tensor:
    """FL* of the paper's appendix A: -alpha_t log(sigmoid(gamma x_t + beta)) / gamma, x_t = x (y = 1) or -x (y = 0).

    Shapes, alpha and reduction as in `sigmoid_focal_loss`. Targets enter as y = 2t - 1, so 0/1 targets give the
    paper's formula exactly. gamma must be > 0; (gamma 2, beta 1) and (gamma 4, beta 0) are the paper's settings.
    """
    if gamma <= 0:
        raise ValueError(f"FL* needs gamma > 0, got {gamma}")
    return _fused("focal_star", inputs, targets, alpha, gamma, beta, reduction)


def quality_focal_loss(inputs: Tensor, targets: Tensor, beta: float = 2.0, reduction: Reduction = "none") -> Tensor:
    """Quality Focal Loss of Generalized Focal Loss (Li et al., 2020): -|q - p|^beta ((1 - q) log(1 - p) + q log(p)).

    inputs: [*] float logits; targets: [*] float soft targets q in [0, 1] (for a detector: the IoU of a positive's
    predicted box with its object at its class, 0 elsewhere). beta >= 0 (the paper's 2) scales down examples whose
    score is already near their quality. Shapes and reduction as `sigmoid_focal_loss`. With 0/1 targets it is FL with
    alpha off (alpha < 0) and gamma = beta.
    """
    if beta < 0:
        raise ValueError(f"QFL needs beta >= 0, got {beta}")
    return _fused("quality_focal", inputs, targets, -1.0, 0.0, beta, reduction)


def varifocal_loss(
    inputs: Tensor, targets: Tensor, alpha: float = 0.75, gamma: float = 2.0, reduction: Reduction = "none"
) -> Tensor:
    """Varifocal Loss (VarifocalNet, Zhang et al., 2021): -q (q log(p) + (1 - q) log(1 - p)) where q > 0, and
    -alpha p^gamma log(1 - p) where q = 0.

    inputs: [*] float logits; targets: [*] float quality q in [0, 1] (IoU-aware classification score target).
    Positives are weighted by their own quality, so that good boxes count most; negatives are down-weighted as in
    FL (alpha 0.75, gamma 2: the paper's). Shapes and reduction as `sigmoid_focal_loss`.
    """
    if gamma < 0 or not 0 <= alpha:
        raise ValueError(f"VFL needs alpha >= 0 and gamma >= 0, got {alpha}, {gamma}")
    return _fused("varifocal", inputs, targets, alpha, gamma, 0.0, reduction)


def binary_cross_entropy(inputs: Tensor, targets: Tensor, alpha: float = -1.0, reduction: Reduction = "none") -> Tensor:
    """CE (alpha < 0) or balanced CE (alpha >= 0): the focal loss with gamma = 0. Shapes as `sigmoid_focal_loss`."""
    return sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=0.0, reduction=reduction)


def sigmoid_focal_loss_from_labels(
    logits: Tensor,
    labels: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    loss: Literal["focal", "focal_star", "quality_focal", "varifocal"] = "focal",
    beta: float = 1.0,
    background_label: int = -1,
    ignore_label: int = -2,
    quality: Tensor | None = None,
) -> Tensor:
    """Summed sigmoid loss of the detector, from one class index per anchor, without a dense one-hot target.

    Args:
        logits: [N, K] float class logits of N anchors (any leading anchor layout flattened to N).
        labels: [N] int64: a class in 0..K-1 (positive for that class, negative for the others), `background_label`
            (negative for every class) or `ignore_label` (contributes nothing).
        alpha, gamma, beta, loss: the loss and its parameters: "focal" (gamma = 0 for CE), "focal_star" (beta its
            shift), "quality_focal" (beta its exponent; alpha and gamma unused) or "varifocal" (alpha, gamma).
        quality: [N] float in [0, 1], the soft target of each anchor's class (the IoU of its predicted box with its
            object; not differentiated): needed by quality_focal and varifocal, None (targets 0/1) for the others.
    Returns:
        scalar float32: the sum over all non-ignored anchors and classes (normalise outside, e.g. by the positives).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, K] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if loss not in KINDS:
        raise ValueError(f"loss must be one of {list(KINDS)}, got {loss!r}")
    if loss == "focal_star" and gamma <= 0:
        raise ValueError(f"FL* needs gamma > 0, got {gamma}")
    if (quality is None) != (loss in ("focal", "focal_star")):
        raise ValueError(f"loss {loss!r}: quality must be given for quality_focal and varifocal, and only for them")
    if quality is not None and quality.shape != labels.shape:
        raise ValueError(f"quality must be [N] = [{labels.shape[0]}], got {tuple(quality.shape)}")
    if background_label >= 0 or ignore_label >= 0 or background_label == ignore_label:
        raise ValueError("background_label and ignore_label must be distinct negative codes")
    labels = labels.long()
    ignored = labels == ignore_label
    # a negative label (background) matches no class column, so it is a negative for every class
    # always a mask (one value per anchor, K times smaller than the logits): asking whether any anchor is ignored
    # would cost a host-device sync every iteration
    mask = (~ignored).to(compute_dtype(logits)).unsqueeze(1)
    soft = None if quality is None else quality.detach().to(compute_dtype(logits)).unsqueeze(1)
    return _FusedSigmoidLoss.apply(
        logits, labels.unsqueeze(1), soft, loss, True, mask, float(alpha), float(gamma), float(beta), True
    )
