"""Figure 4's loss distribution: the streaming histogram, per-anchor losses, and a model run over data made here."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml

from retinanet.analysis.loss_cdf import LossHistogram, anchor_losses, loss_cdf
from retinanet.cli import main
from retinanet.data import SyntheticShapes, eval_transforms
from retinanet.model.checkpoint import save_checkpoint
from retinanet.model.detector import build_model
from retinanet.ops.matching import BACKGROUND, IGNORE, match_anchors

SIZE = 64


def _exact_hardest_share(losses: np.ndarray, fraction: float) -> float:
    """The share of the loss of the top `fraction` of samples, with the boundary sample split as the curve does."""
    ordered = np.sort(losses)
    cum = np.concatenate([[0.0], np.cumsum(ordered)]) / ordered.sum()
    x = np.arange(len(ordered) + 1) / len(ordered)
    return float(1.0 - np.interp(1.0 - fraction, x, cum))


def test_histogram_shares_are_within_the_stated_error():
    rng = np.random.default_rng(0)
    losses = np.exp(rng.normal(-8.0, 3.0, 100_000))  # spread over ~11 decades, as a model's negatives
    h = LossHistogram()
    for chunk in np.array_split(losses, 7):  # streaming: chunks in any number
        h.add(torch.from_numpy(chunk))
    assert h.counts.sum().item() == len(losses) and h.total == pytest.approx(losses.sum(), rel=1e-12)
    assert 0 < h.max_error() < 0.01
    for fraction in (0.01, 0.1, 0.2, 0.5):
        assert abs(h.hardest_share(fraction) - _exact_hardest_share(losses, fraction)) <= h.max_error()
    x, y = h.cumulative()
    assert x[0] == y[0] == 0 and x[-1] == pytest.approx(1) and y[-1] == pytest.approx(1)
    assert (np.diff(x) > 0).all() and (np.diff(y) >= 0).all()


def test_histogram_memory_does_not_grow_and_equal_losses_give_the_diagonal():
    h = LossHistogram(bins_per_decade=8)
    size = h.counts.numel()
    h.add(torch.full((50_000,), 0.3))
    h.add(torch.tensor([0.0, 1e-40, 1e9]))  # below lo and above hi land in the open-ended bins
    assert h.counts.numel() == size and h.counts[0] == 2 and h.counts[-1] == 1
    g = LossHistogram()
    g.add(torch.full((1000,), 0.3))
    assert g.hardest_share(0.2) == pytest.approx(0.2) and g.max_error() == pytest.approx(1 - 10 ** (-1 / 64))
    with pytest.raises(ValueError, match="NaN"):
        g.add(torch.tensor([math.nan]))


def test_anchor_losses_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, -4.0], [1.0, 1.0, 1.0], [0.0, 3.0, -1.0]])
    labels = torch.tensor([0, BACKGROUND, IGNORE, 1])
    pos, neg = anchor_losses(logits, labels, gamma=2.0)

    def fl(x, y):
        p = 1 / (1 + math.exp(-x))
        pt = p if y else 1 - p
        return -((1 - pt) ** 2) * math.log(pt)

    assert pos.tolist() == pytest.approx([fl(2.0, 1), fl(3.0, 1)], rel=1e-12)  # the assigned class only
    assert neg.tolist() == pytest.approx([fl(-3.0, 0) + fl(-2.0, 0) + fl(-4.0, 0)], rel=1e-12)  # all classes
    pos0, neg0 = anchor_losses(logits[:0], labels[:0], gamma=0.0)
    assert pos0.numel() == neg0.numel() == 0


def _model_and_data(num_images: int = 5):
    torch.manual_seed(0)
    model = build_model("retinanet_tiny", num_classes=5, min_size=SIZE, max_size=SIZE).eval()
    data = SyntheticShapes(
        "val", num_images=num_images, image_size=(SIZE, SIZE), transforms=eval_transforms(SIZE, SIZE)
    )
    return model, data


def _expected_counts(model, data) -> dict[str, int]:
    """The counts by match_anchors itself, over the anchors of a SIZE x SIZE image."""
    grids = [(-(-SIZE // s), -(-SIZE // s)) for s in (8, 16, 32, 64, 128)]
    per_level = model.anchor_generator.anchors_per_level(grids, (SIZE, SIZE), torch.device("cpu"), torch.float32)
    anchors = torch.cat(per_level)
    inside = ((anchors[:, 0] + anchors[:, 2]) / 2 < SIZE) & ((anchors[:, 1] + anchors[:, 3]) / 2 < SIZE)
    cfg = model.config
    counts = {"images": len(data), "positive": 0, "negative": 0, "ignored": 0, "outside": 0}
    for record in data.records:
        m = match_anchors(anchors, record.boxes, cfg.fg_iou, cfg.bg_iou, cfg.allow_low_quality_matches)
        counts["positive"] += int(((m >= 0) & inside).sum())
        counts["negative"] += int(((m == BACKGROUND) & inside).sum())
        counts["ignored"] += int(((m == IGNORE) & inside).sum())
        counts["outside"] += int((~inside).sum())
    return counts


def test_loss_cdf_of_a_model_counts_anchors_and_gives_monotone_curves():
    model, data = _model_and_data()
    result = loss_cdf(model, data, gammas=(0.0, 2.0), batch_size=2)
    assert result.counts == _expected_counts(model, data)
    assert result.counts["positive"] > 0 and result.counts["negative"] > 100 * result.counts["positive"] / 10
    for (kind, gamma), h in result.histograms.items():
        assert h.counts.sum().item() == result.counts[kind]
        x, y = h.cumulative()
        assert x[0] == y[0] == 0 and x[-1] == pytest.approx(1) and y[-1] == pytest.approx(1)
        assert (np.diff(x) > 0).all() and (np.diff(y) >= 0).all()
        # sorted from low to high loss: the easiest half carries at most half of the loss
        assert np.interp(0.5, x, y) <= 0.5 + h.max_error()
    shares = result.summary()["curves"]["negative gamma 2"]["hardest_share"]
    assert 0.2 <= shares["0.2"] <= 1 and shares["0.01"] <= shares["0.1"] <= shares["0.2"]
    # gamma focuses the negatives' loss on the hard ones: the hardest 10% carry more of it at gamma 2 than CE
    assert shares["0.1"] > result.histograms["negative", 0.0].hardest_share(0.1)


def test_loss_cdf_batched_equals_one_image_at_a_time():
    model, data = _model_and_data(num_images=3)
    one = loss_cdf(model, data, gammas=(1.0,), batch_size=1)
    batched = loss_cdf(model, data, gammas=(1.0,), batch_size=3)
    assert one.counts == batched.counts
    for key in one.histograms:
        a, b = one.histograms[key], batched.histograms[key]
        assert a.counts.sum() == b.counts.sum()
        # a batch of 1 and one of 3 may run other kernels (oneDNN chooses by shape and thread count): a loss on a
        # bin's edge may fall into the neighbouring bin, nothing more
        moved = (a.counts.cumsum(0) - b.counts.cumsum(0)).abs().max()
        assert moved <= max(2.0, 1e-4 * float(a.counts.sum())), key
        torch.testing.assert_close(a.sums.sum(), b.sums.sum(), rtol=1e-5, atol=1e-12)


def test_constant_logits_spread_the_loss_evenly():
    model, data = _model_and_data(num_images=2)
    with torch.no_grad():
        model.head.cls_logits.weight.zero_()
        model.head.cls_logits.bias.fill_(-2.0)  # every anchor predicts the same: every negative loses the same
    result = loss_cdf(model, data, gammas=(2.0,))
    h = result.histograms["negative", 2.0]
    assert h.hardest_share(0.2) == pytest.approx(0.2) and h.hardest_share(0.01) == pytest.approx(0.01)


def test_loss_cdf_command_writes_figure_csv_and_summary(tmp_path, capsys):
    model, _ = _model_and_data()
    checkpoint = save_checkpoint(tmp_path / "model.pt", model)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"data": {"format": "synthetic", "synthetic_val_images": 3, "synthetic_image_size": SIZE}})
    )
    out = tmp_path / "cdf"
    code = main(
        [
            "analyze",
            "loss-cdf",
            "--checkpoint",
            str(checkpoint),
            "--config",
            str(config),
            "--output",
            str(out),
            "--gammas",
            "0",
            "2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 images:" in printed and "gamma 2:" in printed
    summary = json.loads((out / "loss_cdf.json").read_text())
    assert summary["counts"]["images"] == 3 and set(summary["curves"]) == {
        "positive gamma 0",
        "positive gamma 2",
        "negative gamma 0",
        "negative gamma 2",
    }
    with open(out / "loss_cdf.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["kind", "gamma", "fraction_of_anchors", "cumulative_loss"]
    last_negative = [r for r in rows[1:] if r[0] == "negative" and float(r[1]) == 2.0][-1]
    assert float(last_negative[2]) == pytest.approx(1) and float(last_negative[3]) == pytest.approx(1)
    assert (out / "loss_cdf.png").stat().st_size > 1000
