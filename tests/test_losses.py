import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal

from retinanet import losses as L


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# The worked examples of ../shared/seeds/000_61627f91ac92b879.txt: (p, y, loss kind, value printed in the seed,
# digits the seed printed). The seed cuts some values short (e.g. 0.0128, 9.61E-5 for 9.6175E-5); those are checked
# at its precision, the full-precision ones to 1e-4 relative; test_seed_values_closed_form checks them all to 1e-4.
SEED_EXAMPLES = [
    (0.95, 1, "ce", 0.0512932943875505, None),
    (0.05, 0, "ce", 0.051293294387550, None),
    (0.05, 1, "ce", 2.995732273553991, None),
    (0.95, 0, "ce", 2.995732273553992, None),
    (0.99, 1, "ce", 0.0100503358535014, None),
    (0.01, 0, "ce", 0.0100503358535014, None),
    (0.95, 1, "bce", 0.0128, 3),
    (0.05, 0, "bce", 0.038, 2),
    (0.95, 1, "fl", 3.2058308992219e-5, None),
    (0.05, 0, "fl", 9.61e-5, 3),
    (0.05, 1, "fl", 0.675912094220619, None),
    (0.95, 0, "fl", 2.027736282661858, None),
    (0.99, 1, "fl", 2.51e-7, 3),
    (0.01, 0, "fl", 7.5377518901261e-7, None),
]


@pytest.mark.parametrize("p,y,kind,expected,digits", SEED_EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_worked_examples(p, y, kind, expected, digits, dtype):
    x = torch.tensor([_logit(p)], dtype=dtype)
    t = torch.tensor([float(y)], dtype=dtype)
    if kind == "ce":
        value = L.binary_cross_entropy(x, t, alpha=-1)
    elif kind == "bce":
        value = L.binary_cross_entropy(x, t, alpha=0.25)
    else:
        value = L.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0)
    value = value.item()
    if digits is None:
        assert value == pytest.approx(expected, rel=1e-4)
    else:  # the seed printed this one cut to `digits` significant digits: within one unit of its last digit
        unit = 10 ** (math.floor(math.log10(expected)) - digits + 1)
        assert abs(value - expected) <= unit


@pytest.mark.parametrize("p,y,kind,expected,digits", SEED_EXAMPLES)
def test_seed_values_closed_form(p, y, kind, expected, digits):
    pt = p if y == 1 else 1 - p
    at = {"ce": 1.0, "bce": 0.25 if y == 1 else 0.75, "fl": 0.25 if y == 1 else 0.75}[kind]
    gamma = 2.0 if kind == "fl" else 0.0
    exact = -at * (1 - pt) ** gamma * math.log(pt)
    x = torch.tensor([_logit(p)], dtype=torch.float64)
    value = L.sigmoid_focal_loss(
        x, torch.tensor([float(y)], dtype=torch.float64), alpha=-1 if kind == "ce" else 0.25, gamma=gamma
    ).item()
    assert value == pytest.approx(exact, rel=1e-4)


def test_seed_ratios_fl_vs_ce():
    # Scenario 3 of the seed: an easy example's FL is ~40,000x smaller than its CE; the paper's 100x at p_t = 0.9.
    x = torch.tensor([_logit(0.99), _logit(0.9)])
    t = torch.ones(2)
    ce = L.binary_cross_entropy(x, t)
    fl = L.sigmoid_focal_loss(x, t, alpha=-1, gamma=2.0)
    ratio = (ce / fl).tolist()
    assert ratio[0] == pytest.approx(1e4, rel=1e-3)
    assert ratio[1] == pytest.approx(100, rel=1e-3)


SHAPES = [(7,), (3, 5), (2, 17, 11), (4, 3, 2, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.75, 0.5), (0.25, 5.0)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_torchvision_values_and_grads(shape, alpha, gamma, reduction):
    g = torch.Generator().manual_seed(hash((shape, alpha, gamma)) % 2**31)
    x = (torch.randn(shape, generator=g) * 4).requires_grad_()
    t = (torch.rand(shape, generator=g) < 0.3).float()
    ours = L.sigmoid_focal_loss(x, t, alpha, gamma, reduction)
    x2 = x.detach().clone().requires_grad_()
    ref = tv_focal(x2, t, alpha, gamma, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(ours)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    # torchvision's gradient is NaN where 1 - p_t rounds to 0 with gamma < 1 (0 * inf); ours is the limit, 0
    assert torch.isfinite(x.grad).all()
    ok = torch.isfinite(x2.grad)
    torch.testing.assert_close(x.grad[ok], x2.grad[ok], rtol=1e-4, atol=1e-6)


def test_soft_targets_match_torchvision():
    x = (torch.randn(64, 5) * 3).requires_grad_()
    t = torch.rand(64, 5)
    ours = L.sigmoid_focal_loss(x, t, reduction="sum")
    x2 = x.detach().clone().requires_grad_()
    ref = tv_focal(x2, t, reduction="sum")
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    x = (torch.randn(50, 7) * 3).to(dtype).requires_grad_()
    t = (torch.rand(50, 7) < 0.2).to(dtype)
    out = L.sigmoid_focal_loss(x, t, reduction="none")
    assert out.dtype == dtype
    ref = tv_focal(x.detach().float(), t.float(), reduction="none")
    # one rounding to `dtype` apart at most
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-3)
    total = L.sigmoid_focal_loss(x, t, reduction="sum")
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ref.sum(), rtol=1e-5, atol=1e-5)
    total.backward()
    assert x.grad.dtype == dtype


def test_invalid_reduction_and_shapes():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="reduction"):
        L.sigmoid_focal_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="same shape"):
        L.sigmoid_focal_loss(x, torch.zeros(4))
    with pytest.raises(ValueError, match="gamma"):
        L.sigmoid_focal_loss_star(x, x, gamma=0.0)


def test_gamma_zero_is_binary_cross_entropy():
    x = torch.randn(40, 3) * 5
    t = (torch.rand(40, 3) < 0.5).float()
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    torch.testing.assert_close(L.sigmoid_focal_loss(x, t, alpha=-1, gamma=0.0), bce)
    # balanced CE: alpha_t weights
    a_t = 0.25 * t + 0.75 * (1 - t)
    torch.testing.assert_close(L.binary_cross_entropy(x, t, alpha=0.25), a_t * bce)


def test_focal_star_gamma1_beta0_is_binary_cross_entropy():
    x = torch.randn(40, 3) * 5
    t = (torch.rand(40, 3) < 0.5).float()
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    torch.testing.assert_close(L.sigmoid_focal_loss_star(x, t, alpha=-1, gamma=1.0, beta=0.0), bce)


def test_focal_star_formula():
    x = torch.tensor([1.5, -0.3, 2.0, -4.0])
    t = torch.tensor([1.0, 1.0, 0.0, 0.0])
    xt = torch.where(t > 0, x, -x)
    for gamma, beta in [(2.0, 1.0), (4.0, 0.0)]:
        expected = -torch.log(torch.sigmoid(gamma * xt + beta)) / gamma
        expected = expected * torch.where(t > 0, 0.25, 0.75)
        torch.testing.assert_close(L.sigmoid_focal_loss_star(x, t, alpha=0.25, gamma=gamma, beta=beta), expected)


@pytest.mark.parametrize("fn", [L.sigmoid_focal_loss, L.sigmoid_focal_loss_star])
def test_alpha_one_zeroes_negatives_and_zero_zeroes_positives(fn):
    x = torch.randn(30, 4) * 3
    t = (torch.rand(30, 4) < 0.4).float()
    out1 = fn(x, t, alpha=1.0)
    out0 = fn(x, t, alpha=0.0)
    assert torch.all(out1[t == 0] == 0) and torch.all(out1[t == 1] > 0)
    assert torch.all(out0[t == 1] == 0) and torch.all(out0[t == 0] > 0)


def _closed_form_grads(x, y01, gamma, beta):
    """Appendix B, y in {-1, +1}: dCE/dx = y (p_t - 1); dFL/dx = y (1-p_t)^g (g p_t log p_t + p_t - 1);
    dFL*/dx = y (p*_t - 1)."""
    y = 2 * y01 - 1
    p = torch.sigmoid(x)
    pt = torch.where(y01 > 0, p, 1 - p)
    ce = y * (pt - 1)
    fl = y * (1 - pt) ** gamma * (gamma * pt * torch.log(pt) + pt - 1)
    pst = torch.sigmoid(gamma * y * x + beta)
    fls = y * (pst - 1)
    return ce, fl, fls


@pytest.mark.parametrize("gamma,beta", [(2.0, 1.0), (4.0, 0.0), (0.5, 0.5)])
def test_gradients_equal_appendix_b(gamma, beta):
    x = (torch.randn(200, dtype=torch.float64) * 3).requires_grad_()
    t = (torch.rand(200) < 0.5).double()
    ce, fl, fls = _closed_form_grads(x.detach(), t, gamma, beta)
    for fn, expected in [
        (lambda a: L.binary_cross_entropy(a, t, alpha=-1), ce),
        (lambda a: L.sigmoid_focal_loss(a, t, alpha=-1, gamma=gamma), fl),
        (lambda a: L.sigmoid_focal_loss_star(a, t, alpha=-1, gamma=gamma, beta=beta), fls),
    ]:
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        torch.testing.assert_close(grad, expected)


def test_gradcheck_every_loss():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = (torch.rand(6, 5, generator=g) < 0.4).double()
    soft = torch.rand(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, -1, 4, -2, 2, -1])
    boxes = torch.tensor([[0.0, 0, 4, 5], [2, 2, 9, 6], [1, 1, 3, 8]], dtype=torch.float64)
    tgt = torch.tensor([[1.0, 0, 5, 4], [3, 1, 8, 7], [0, 2, 2, 9]], dtype=torch.float64)
    checks = [
        lambda a: L.sigmoid_focal_loss(a, t, reduction="none"),
        lambda a: L.sigmoid_focal_loss(a, soft, 0.5, 1.5, reduction="mean"),
        lambda a: L.sigmoid_focal_loss(a, t, -1, 0.0, reduction="sum"),
        lambda a: L.sigmoid_focal_loss(a, t, 0.25, 0.5, reduction="sum"),
        lambda a: L.sigmoid_focal_loss_star(a, t, reduction="none"),
        lambda a: L.sigmoid_focal_loss_star(a, t, 0.25, 4.0, 0.0, reduction="sum"),
        lambda a: L.sigmoid_focal_loss_from_labels(a, labels),
        lambda a: L.sigmoid_focal_loss_from_labels(a, labels, loss="focal_star", gamma=2.0, beta=1.0),
        lambda a: L.ohem_loss_from_labels(a, labels, budget=8),
    ]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (x,))
    d = (torch.randn(5, 4, dtype=torch.float64) * 0.3).requires_grad_()
    d_t = torch.randn(5, 4, dtype=torch.float64) * 0.3
    assert torch.autograd.gradcheck(lambda a: L.smooth_l1_loss(a, d_t, beta=0.5), (d,))
    assert torch.autograd.gradcheck(lambda a: L.l1_loss(a, d_t), (d,))
    b = boxes.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: L.giou_loss(a, tgt), (b,))


@pytest.mark.parametrize("fn", [L.sigmoid_focal_loss, L.sigmoid_focal_loss_star, L.binary_cross_entropy])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits_are_finite(fn, dtype):
    x = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4] * 2)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype).requires_grad_()
    t = torch.tensor([0.0] * 7 + [1.0] * 7, dtype=dtype)
    out = fn(x, t, reduction="none")
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad.float()).all()
    # a confidently wrong logit costs about |x| (times alpha_t, / 1 for CE): the loss does not saturate
    wrong = out.float()[[0, 13]]  # y = 0 with x = -1e4 is right; y = 0 at index 6 (x = 1e4) is wrong
    assert wrong[0] < 1e-3
    assert out.float()[6] > 100


def test_labels_form_equals_dense_form():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g) * 3
    labels = torch.randint(-2, 6, (300,), generator=g)
    onehot = (labels[:, None] == torch.arange(6)).float()
    valid = (labels != -2).float()[:, None]
    for kind, fn in [("focal", L.sigmoid_focal_loss), ("focal_star", L.sigmoid_focal_loss_star)]:
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ours = L.sigmoid_focal_loss_from_labels(xa, labels, loss=kind, gamma=2.0)
        dense = (fn(xb, onehot, 0.25, 2.0) * valid).sum()
        torch.testing.assert_close(ours, dense)
        ours.backward()
        dense.backward()
        torch.testing.assert_close(xa.grad, xb.grad)
        assert torch.all(xa.grad[labels == -2] == 0)


def test_labels_form_validates():
    with pytest.raises(ValueError, match="labels"):
        L.sigmoid_focal_loss_from_labels(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="negative"):
        L.sigmoid_focal_loss_from_labels(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), background_label=0)


def test_eager_chunks_cover_large_inputs():
    # more rows than one chunk: the chunked eager path must equal the whole-tensor formula
    x = torch.randn(70_000, 3) * 2
    t = (torch.rand(70_000, 3) < 0.01).float()
    torch.testing.assert_close(
        L.sigmoid_focal_loss(x, t, reduction="sum"), tv_focal(x, t, reduction="sum"), rtol=1e-5, atol=1e-3
    )


@pytest.mark.slow
def test_compiled_backend_equals_eager():
    x = torch.randn(2, 2000, 80) * 3
    t = (torch.rand_like(x) < 0.01).float()
    labels = torch.randint(-2, 80, (4000,))
    results = {}
    for backend in ("eager", "compile"):
        L.set_loss_backend(backend)
        try:
            xa = x.clone().requires_grad_()
            la = L.sigmoid_focal_loss(xa, t, reduction="sum")
            la.backward()
            xb = x.reshape(-1, 80).clone().requires_grad_()
            lb = L.sigmoid_focal_loss_from_labels(xb, labels)
            lb.backward()
            results[backend] = (la.detach(), xa.grad, lb.detach(), xb.grad)
        finally:
            L.set_loss_backend("auto")
    for a, b in zip(results["eager"], results["compile"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_smooth_l1_and_l1():
    d = torch.tensor([[0.0, 0.05, -0.5, 2.0]])
    z = torch.zeros_like(d)
    beta = 0.11
    expected = torch.tensor([0.0, 0.5 * 0.05**2 / beta, 0.5 - 0.055, 2.0 - 0.055])
    torch.testing.assert_close(L.smooth_l1_loss(d, z, beta=beta, reduction="none")[0], expected)
    torch.testing.assert_close(L.smooth_l1_loss(d, z, beta=0.0), L.l1_loss(d, z))
    assert L.l1_loss(d, z).item() == pytest.approx(2.55)


def test_giou_hand_values():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 1, 1]])
    b = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 3], [2, 2, 3, 3]])
    # identical: 0; half-overlap: iou 1/7, hull 9, union 7 -> giou 1/7 - 2/9; disjoint: iou 0, hull 9, union 2
    expected = torch.tensor([0.0, 1 - (1 / 7 - 2 / 9), 1 - (0 - 7 / 9)])
    torch.testing.assert_close(L.giou_loss(a, b, reduction="none"), expected, rtol=1e-5, atol=1e-5)


def test_hard_negative_mining():
    losses = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 0.05])
    pos = torch.tensor([True, False, False, False, False, False, False])
    keep = L.hard_negative_mining(losses, pos, budget=3)
    assert keep.tolist() == [False, True, False, True, False, True, False]
    keep = L.hard_negative_mining(losses, pos, budget=100, neg_pos_ratio=3.0)
    assert keep.tolist() == [True, True, False, True, False, True, False]
    keep = L.hard_negative_mining(losses, pos, budget=2, neg_pos_ratio=3.0)
    assert keep.tolist() == [True, True, False, False, False, False, False]
    # no positives: a ratio still keeps the hardest negatives (ratio x 1) rather than nothing
    keep = L.hard_negative_mining(losses, torch.zeros(7, dtype=torch.bool), budget=10, neg_pos_ratio=3.0)
    assert keep.sum() == 3


def test_ohem_loss_uses_only_hard_examples():
    x = torch.zeros(5, 2)
    x[1, 0] = 6.0  # a confident false positive: the hardest negative
    labels = torch.tensor([0, -1, -1, -1, -2])
    out = L.ohem_loss_from_labels(x, labels, budget=2)
    ce = F.binary_cross_entropy_with_logits(x, (labels[:, None] == torch.arange(2)).float(), reduction="none").sum(1)
    assert out.item() == pytest.approx((ce[1] + ce[0]).item(), rel=1e-6)


def test_backward_twice_with_retain_graph():
    x = (torch.randn(20, 4) * 2).requires_grad_()
    t = (torch.rand(20, 4) < 0.3).float()
    loss = L.sigmoid_focal_loss(x, t, reduction="sum")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3, x)
    torch.testing.assert_close(g2, 3 * g1)


def test_hard_negative_mining_with_nms_as_the_paper():
    # anchors 0 and 1 overlap heavily (IoU 0.9); 1 is harder, so NMS drops 0 before the hardest are picked
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [40, 40, 50, 50]])
    losses = torch.tensor([4.0, 5.0, 1.0, 0.5])
    pos = torch.zeros(4, dtype=torch.bool)
    assert L.hard_negative_mining(losses, pos, budget=2).tolist() == [True, True, False, False]
    keep = L.hard_negative_mining(losses, pos, budget=2, boxes=boxes, nms_thresh=0.5)
    assert keep.tolist() == [False, True, True, False]
    # a looser threshold keeps both overlapping anchors
    keep = L.hard_negative_mining(losses, pos, budget=2, boxes=boxes, nms_thresh=0.9)
    assert keep.tolist() == [True, True, False, False]
