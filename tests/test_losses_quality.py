"""The focal loss's successors (retinanet.ops.losses: QFL, VFL) and the IoU box losses (retinanet.ops.box_losses:
DIoU, CIoU): hand-worked values, the papers' formulas written out in plain torch (values and autograd gradients),
the detector's labels form, extreme logits, and the compiled backend."""

import math

import pytest
import torch

from retinanet import losses as L


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _ce(p: float, q: float) -> float:
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


# (p, q, QFL beta 2, VFL alpha .75 gamma 2), worked by hand from the papers' formulas
HAND = [
    (0.5, 0.8, 0.09 * math.log(2), 0.8 * math.log(2)),  # |.8 - .5|^2 CE; q CE
    (0.9, 0.6, 0.09 * _ce(0.9, 0.6), 0.6 * _ce(0.9, 0.6)),
    (0.2, 0.0, 0.04 * -math.log(0.8), 0.75 * 0.04 * -math.log(0.8)),  # a negative: p^2 log(1 - p) (times alpha)
    (0.7, 1.0, 0.09 * -math.log(0.7), 1.0 * -math.log(0.7)),
]


@pytest.mark.parametrize("p,q,qfl,vfl", HAND)
def test_hand_worked_values(p, q, qfl, vfl):
    x, t = torch.tensor([_logit(p)], dtype=torch.float64), torch.tensor([q], dtype=torch.float64)
    assert L.quality_focal_loss(x, t, beta=2.0).item() == pytest.approx(qfl, rel=1e-9)
    assert L.varifocal_loss(x, t, alpha=0.75, gamma=2.0).item() == pytest.approx(vfl, rel=1e-9)


def _qfl_reference(x, t, beta):
    p = torch.sigmoid(x)
    return -((t - p).abs() ** beta) * ((1 - t) * torch.log(1 - p) + t * torch.log(p))


def _vfl_reference(x, t, alpha, gamma):
    p = torch.sigmoid(x)
    positive = -t * (t * torch.log(p) + (1 - t) * torch.log(1 - p))
    negative = -alpha * p**gamma * torch.log(1 - p)
    return torch.where(t > 0, positive, negative)


@pytest.mark.parametrize("beta", [2.0, 1.0, 0.5, 3.0])
def test_qfl_values_and_gradients_equal_the_formula(beta):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(400, dtype=torch.float64, generator=g) * 3).requires_grad_()
    t = torch.rand(400, dtype=torch.float64, generator=g) * (torch.rand(400, generator=g) < 0.5)
    ours, ref = L.quality_focal_loss(x, t, beta=beta), _qfl_reference(x, t, beta)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


@pytest.mark.parametrize("alpha,gamma", [(0.75, 2.0), (0.5, 1.0), (1.0, 0.5)])
def test_vfl_values_and_gradients_equal_the_formula(alpha, gamma):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(400, dtype=torch.float64, generator=g) * 3).requires_grad_()
    t = torch.rand(400, dtype=torch.float64, generator=g) * (torch.rand(400, generator=g) < 0.5)
    ours, ref = L.varifocal_loss(x, t, alpha, gamma), _vfl_reference(x, t, alpha, gamma)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


def test_qfl_with_hard_targets_is_focal_loss_without_alpha():
    x = torch.randn(50, 4, dtype=torch.float64) * 2
    t = (torch.rand(50, 4) < 0.3).double()
    torch.testing.assert_close(L.quality_focal_loss(x, t, beta=2.0), L.sigmoid_focal_loss(x, t, alpha=-1, gamma=2.0))


@pytest.mark.parametrize("kind", ["quality_focal", "varifocal"])
def test_labels_form_equals_dense_form(kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g) * 3
    labels = torch.randint(-2, 6, (300,), generator=g)
    quality = torch.rand(300, generator=g)
    dense_t = (labels[:, None] == torch.arange(6)).float() * quality[:, None]
    valid = (labels != -2).float()[:, None]
    dense_fn = (
        (lambda a: L.quality_focal_loss(a, dense_t, 2.0))
        if kind == "quality_focal"
        else (lambda a: L.varifocal_loss(a, dense_t, 0.75, 2.0))
    )
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = L.sigmoid_focal_loss_from_labels(xa, labels, alpha=0.75, gamma=2.0, beta=2.0, loss=kind, quality=quality)
    dense = (dense_fn(xb) * valid).sum()
    torch.testing.assert_close(ours, dense)
    ours.backward()
    dense.backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    assert torch.all(xa.grad[labels == -2] == 0)


def test_labels_form_needs_quality_for_the_iou_aware_losses_only():
    x, labels = torch.zeros(4, 3), torch.tensor([0, -1, 2, -2])
    with pytest.raises(ValueError, match="quality must be given"):
        L.sigmoid_focal_loss_from_labels(x, labels, loss="varifocal")
    with pytest.raises(ValueError, match="quality must be given"):
        L.sigmoid_focal_loss_from_labels(x, labels, loss="focal", quality=torch.ones(4))
    with pytest.raises(ValueError, match=r"quality must be \[N\]"):
        L.sigmoid_focal_loss_from_labels(x, labels, loss="quality_focal", quality=torch.ones(3))


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    soft = torch.rand(6, 5, generator=g, dtype=torch.float64) * (torch.rand(6, 5, generator=g) < 0.5)
    labels, quality = torch.tensor([0, -1, 4, -2, 2, -1]), torch.rand(6, generator=g, dtype=torch.float64)
    for fn in [
        lambda a: L.quality_focal_loss(a, soft, reduction="none"),
        lambda a: L.varifocal_loss(a, soft, reduction="sum"),
        lambda a: L.sigmoid_focal_loss_from_labels(a, labels, loss="quality_focal", beta=2.0, quality=quality),
        lambda a: L.sigmoid_focal_loss_from_labels(a, labels, loss="varifocal", quality=quality),
    ]:
        assert torch.autograd.gradcheck(fn, (x,))
    boxes = torch.tensor([[0.0, 0, 4, 5], [2, 2, 9, 6], [1, 1, 3, 8]], dtype=torch.float64).requires_grad_()
    tgt = torch.tensor([[1.0, 0, 5, 4], [3, 1, 8, 7], [0, 2, 2, 9]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: L.diou_loss(a, tgt), (boxes,))
    # CIoU's trade-off alpha is held constant in its gradient, as the paper's and torchvision's: the analytical
    # gradient is that of DIoU + alpha v with alpha fixed, not the finite difference of the whole formula
    alpha_fixed = torch.autograd.grad(L.ciou_loss(boxes, tgt), boxes)[0]
    assert torch.isfinite(alpha_fixed).all() and not torch.equal(
        alpha_fixed, torch.autograd.grad(L.diou_loss(boxes, tgt), boxes)[0]
    )


@pytest.mark.parametrize("fn", [L.quality_focal_loss, L.varifocal_loss])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_are_finite(fn, dtype):
    x = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4] * 2).to(dtype).requires_grad_()
    t = torch.tensor([0.0] * 7 + [0.7] * 7, dtype=dtype)
    out = fn(x, t, reduction="none")
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(x.grad.float()).all()
    assert out.float()[6] > 100  # a confident false positive costs about |x|: no saturation


def test_diou_and_ciou_hand_values():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 4, 2], [0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [0, 0, 2, 2]])
    # 1: IoU 1/7, centres sqrt(2) apart, enclosing diagonal^2 18; same aspect ratio (v = 0)
    # 2: IoU 1/2, centres 1 apart, enclosing [0, 0, 4, 2] (diagonal^2 20); v = 4/pi^2 (atan 1 - atan 2)^2
    v = 4 / math.pi**2 * (math.atan(1.0) - math.atan(2.0)) ** 2
    diou = torch.tensor([1 - 1 / 7 + 2 / 18, 1 - 0.5 + 1 / 20, 0.0])
    ciou = diou + torch.tensor([0.0, v / (1 - 0.5 + v) * v, 0.0])
    torch.testing.assert_close(L.diou_loss(a, b, reduction="none"), diou, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(L.ciou_loss(a, b, reduction="none"), ciou, rtol=1e-5, atol=1e-6)
    assert L.diou_loss(a, b).item() == pytest.approx(float(diou.sum()), rel=1e-5)


@pytest.mark.parametrize("fn", [L.giou_loss, L.diou_loss, L.ciou_loss])
def test_iou_losses_of_no_boxes_are_zero(fn):
    empty = torch.zeros(0, 4)
    assert fn(empty, empty).item() == 0.0 and fn(empty, empty, reduction="mean").item() == 0.0


@pytest.mark.slow
def test_compiled_backend_equals_eager():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4000, 80, generator=g) * 3
    labels = torch.randint(-2, 80, (4000,), generator=g)
    quality = torch.rand(4000, generator=g)
    results = {}
    for backend in ("eager", "compile"):
        L.set_loss_backend(backend)
        try:
            out = []
            for kind in ("quality_focal", "varifocal"):
                xa = x.clone().requires_grad_()
                value = L.sigmoid_focal_loss_from_labels(xa, labels, loss=kind, beta=2.0, alpha=0.75, quality=quality)
                value.backward()
                out += [value.detach(), xa.grad]
            results[backend] = out
        finally:
            L.set_loss_backend("auto")
    for a, b in zip(results["eager"], results["compile"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
