"""The paper's loss curves and the seed article's worked examples, against closed forms computed here."""

import csv
import math
from pathlib import Path

import pytest
import torch

from retinanet.analysis.curves import (
    examples_table,
    focal_loss_star_vs_xt,
    focal_loss_vs_pt,
    loss_derivatives_vs_xt,
    loss_examples,
    write_loss_curves,
)
from retinanet.cli import main

P_T = [0.01, 0.1, 0.5, 0.9, 0.968, 0.999]
X_T = [-4.0, -1.3, -0.2, 0.0, 0.7, 3.5]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_figure1_is_the_focal_loss_of_p_t():
    curves = focal_loss_vs_pt(torch.tensor(P_T, dtype=torch.float64))
    for gamma in (0.0, 0.5, 1.0, 2.0, 5.0):
        name = "CE (gamma 0)" if gamma == 0 else f"FL gamma {gamma:g}"
        for p, value in zip(P_T, curves.series[name].tolist()):
            assert value == pytest.approx(-((1 - p) ** gamma) * math.log(p), rel=1e-12, abs=1e-300)


def test_figure1_reproduces_the_papers_down_weighting():
    # gamma 2: 100x less loss than CE at p_t = 0.9, about 1000x at 0.968, at most 4x for p_t <= 0.5
    curves = focal_loss_vs_pt(torch.tensor([0.9, 0.968, 0.5, 0.3], dtype=torch.float64), gammas=(0.0, 2.0))
    ratio = (curves.series["CE (gamma 0)"] / curves.series["FL gamma 2"]).tolist()
    assert ratio[0] == pytest.approx(100.0)
    assert 900 < ratio[1] < 1000
    assert ratio[2] == pytest.approx(4.0) and ratio[3] < 4.0


def test_figure5_fl_star_against_closed_forms():
    curves = focal_loss_star_vs_xt(torch.tensor(X_T, dtype=torch.float64))
    for (gamma, beta), name in [
        ((1.0, 0.0), "FL* gamma 1 beta 0 (= CE)"),
        ((2.0, 1.0), "FL* gamma 2 beta 1"),
        ((4.0, 0.0), "FL* gamma 4 beta 0"),
    ]:
        for x, value in zip(X_T, curves.series[name].tolist()):
            assert value == pytest.approx(-math.log(_sigmoid(gamma * x + beta)) / gamma, rel=1e-12)
    for x, value in zip(X_T, curves.series["FL gamma 2"].tolist()):
        p = _sigmoid(x)
        assert value == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-12)


def test_figure6_derivatives_are_appendix_b():
    curves = loss_derivatives_vs_xt(torch.tensor(X_T, dtype=torch.float64))
    for i, x in enumerate(X_T):
        p = _sigmoid(x)  # y = +1: p_t = p
        assert curves.series["CE"][i].item() == pytest.approx(p - 1, rel=1e-12)
        fl = (1 - p) ** 2 * (2 * p * math.log(p) + p - 1)
        assert curves.series["FL gamma 2"][i].item() == pytest.approx(fl, rel=1e-10)
        for gamma, beta in ((2.0, 1.0), (4.0, 0.0)):
            star = _sigmoid(gamma * x + beta) - 1
            assert curves.series[f"FL* gamma {gamma:g} beta {beta:g}"][i].item() == pytest.approx(star, rel=1e-12)


def test_write_loss_curves_gives_png_and_csv(tmp_path):
    files = write_loss_curves(tmp_path, points=100)
    names = sorted(p.name for p in files)
    assert names == sorted(
        f"{s}.{e}" for s in ("fig1_focal_loss", "fig5_focal_loss_star", "fig6_derivatives") for e in ("png", "csv")
    )
    assert all(p.stat().st_size > 1000 for p in files if p.suffix == ".png")
    with open(tmp_path / "fig1_focal_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["p_t", "CE (gamma 0)", "FL gamma 0.5", "FL gamma 1", "FL gamma 2", "FL gamma 5"]
    assert len(rows) == 1 + 99 and float(rows[1][0]) == pytest.approx(0.01)
    p, ce, fl2 = float(rows[50][0]), float(rows[50][1]), float(rows[50][4])
    assert ce == pytest.approx(-math.log(p)) and fl2 == pytest.approx(-((1 - p) ** 2) * math.log(p))
    with open(tmp_path / "fig6_derivatives.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "x_t" and len(rows) == 1 + 101 and float(rows[1][0]) == -5.0


# the seed article's numbers (000_61627f91ac92b879.txt), as printed there
SEED = {
    (0.95, "foreground"): dict(ce=0.0512932943875505, balanced_ce=0.0128, fl=3.2058308992219e-5),
    (0.05, "background"): dict(ce=0.051293294387550, balanced_ce=0.038, fl=9.61e-5),
    (0.05, "foreground"): dict(ce=2.995732273553991, fl=0.675912094220619),
    (0.95, "background"): dict(ce=2.995732273553992, fl=2.027736282661858),
    (0.99, "foreground"): dict(ce=0.0100503358535014, fl=2.51e-7),
    (0.01, "background"): dict(ce=0.0100503358535014, fl=7.5377518901261e-7),
}


def test_examples_match_the_seed_article():
    rows = {(r.p, r.kind): r for r in loss_examples([0.95, 0.05, 0.99, 0.01])}
    assert len(rows) == 8
    for key, expected in SEED.items():
        for name, value in expected.items():
            mantissa, exponent = f"{value:e}".split("e")
            digits = len(mantissa.replace(".", "").rstrip("0"))
            last_digit = 10.0 ** (int(exponent) - digits + 1)  # the seed's numbers are good to their last digit
            assert abs(getattr(rows[key], name) - value) <= max(last_digit, 1e-13 * value), (key, name)
    assert rows[0.95, "foreground"].ratio == pytest.approx(1600.0)  # the article's "1600 times smaller"
    assert rows[0.99, "foreground"].ratio == pytest.approx(40000.0)  # and "40,000 times"
    assert rows[0.95, "background"].p_t == pytest.approx(0.05)


def test_examples_table_and_command(capsys):
    table = examples_table(loss_examples([0.95]))
    assert table.splitlines()[2] == "| 0.95 | foreground | 0.95 | 0.05129 | 0.01282 | 3.206e-05 | 1600 |"
    assert main(["analyze", "examples", "--p", "0.95", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "| 0.05 | background | 0.95 | 0.05129 | 0.03847 | 9.617e-05 | 533.3 |" in out and out.count("\n") == 6


def test_examples_reject_a_certain_probability(capsys):
    with pytest.raises(ValueError, match="p = 1.0 must be strictly between 0 and 1"):
        loss_examples([0.5, 1.0])
    assert main(["analyze", "examples", "--p", "0"]) == 2
    assert "p = 0.0 must be strictly between" in capsys.readouterr().err


def test_loss_curves_command(tmp_path, capsys):
    assert main(["analyze", "loss-curves", "--output", str(tmp_path), "--points", "20"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6 and all(Path(p).is_file() for p in printed)
    with open(tmp_path / "fig5_focal_loss_star.csv") as f:
        header = next(csv.reader(f))
    assert header == ["x_t", "FL gamma 2", "FL* gamma 1 beta 0 (= CE)", "FL* gamma 2 beta 1", "FL* gamma 4 beta 0"]
