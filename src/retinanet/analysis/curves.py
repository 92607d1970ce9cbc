"""The paper's loss curves and the worked examples of CE, balanced CE and FL, computed by retinanet.losses.

- Figure 1: FL = -(1 - p_t)^gamma log(p_t) against p_t for gamma in {0, 0.5, 1, 2, 5} (gamma 0 is CE).
- Figure 5 (appendix A): CE, FL (gamma 2) and FL* = -log(sigmoid(gamma* x_t + beta*)) / gamma* against x_t = y x
  for (gamma*, beta*) in {(1, 0), (2, 1), (4, 0)}; FL* (1, 0) is CE.
- Figure 6 (appendix B): the derivatives with respect to x of CE, FL (gamma 2), FL* (2, 1) and FL* (4, 0), for a
  positive (y = +1, so x_t = x); a negative's are the mirror image.

The curves are the values and gradients of the very functions the detector trains with (the fused losses and their
closed-form backward), evaluated in float64, unweighted (alpha off) as in the paper's figures. The examples table is
the seed article's: CE, balanced CE and FL of a foreground (y = 1) and a background (y = 0) example at each
predicted probability p of the foreground class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from retinanet.analysis.plots import Panel, save_line_plot, write_csv
from retinanet.ops.losses import binary_cross_entropy, sigmoid_focal_loss, sigmoid_focal_loss_star

__all__ = [
    "FIGURE1_GAMMAS",
    "FIGURE5_SETTINGS",
    "Curves",
    "ExampleRow",
    "focal_loss_vs_pt",
    "focal_loss_star_vs_xt",
    "loss_derivatives_vs_xt",
    "loss_examples",
    "examples_table",
    "write_loss_curves",
]

FIGURE1_GAMMAS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0)
FIGURE5_SETTINGS: tuple[tuple[float, float], ...] = ((1.0, 0.0), (2.0, 1.0), (4.0, 0.0))  # FL* (gamma*, beta*)

LossOfLogits = Callable[[Tensor], Tensor]  # logits [N] float64 of positives (y = 1) -> loss [N]


@dataclass
class Curves:
    """Curves sharing one x axis: x [N] float64 named x_name; series: name -> [N] float64."""

    x_name: str
    x: Tensor
    series: dict[str, Tensor]
    y_name: str

    def rows(self) -> list[list[float]]:
        """The CSV rows: x, then each series, per point."""
        columns = [self.x, *self.series.values()]
        return [[float(c[i]) for c in columns] for i in range(len(self.x))]


def _logit(p: Tensor) -> Tensor:
    return torch.log(p) - torch.log1p(-p)


def _gamma_name(gamma: float) -> str:
    return "CE (gamma 0)" if gamma == 0 else f"FL gamma {gamma:g}"


def _star_name(gamma: float, beta: float) -> str:
    return f"FL* gamma {gamma:g} beta {beta:g}" + (" (= CE)" if (gamma, beta) == (1.0, 0.0) else "")


def _focal(gamma: float) -> LossOfLogits:
    return lambda x: sigmoid_focal_loss(x, torch.ones_like(x), alpha=-1.0, gamma=gamma)


def _focal_star(gamma: float, beta: float) -> LossOfLogits:
    return lambda x: sigmoid_focal_loss_star(x, torch.ones_like(x), alpha=-1.0, gamma=gamma, beta=beta)


def _appendix_losses() -> dict[str, LossOfLogits]:
    """The losses of Figures 5 and 6: CE, FL gamma 2, FL* (2, 1), FL* (4, 0)."""
    return {
        "CE": lambda x: binary_cross_entropy(x, torch.ones_like(x)),
        "FL gamma 2": _focal(2.0),
        _star_name(2.0, 1.0): _focal_star(2.0, 1.0),
        _star_name(4.0, 0.0): _focal_star(4.0, 0.0),
    }


def focal_loss_vs_pt(p_t: Tensor, gammas: Sequence[float] = FIGURE1_GAMMAS) -> Curves:
    """Figure 1: FL of an example whose true class has probability p_t. p_t: [N] in (0, 1) -> series [N]."""
    x = _logit(p_t.double())
    series = {_gamma_name(g): _focal(g)(x) for g in gammas}
    return Curves("p_t", p_t.double(), series, "loss")


def focal_loss_star_vs_xt(x_t: Tensor, settings: Sequence[tuple[float, float]] = FIGURE5_SETTINGS) -> Curves:
    """Figure 5: FL (gamma 2) and FL* for each (gamma*, beta*) against x_t = y x. x_t: [N] -> series [N]."""
    x = x_t.double()
    series = {"FL gamma 2": _focal(2.0)(x)}
    series |= {_star_name(g, b): _focal_star(g, b)(x) for g, b in settings}
    return Curves("x_t", x, series, "loss")


def loss_derivatives_vs_xt(x_t: Tensor) -> Curves:
    """Figure 6: dL/dx of CE, FL (gamma 2), FL* (2, 1) and FL* (4, 0) for a positive (x_t = x), by the losses'
    own backward (the closed forms of appendix B). x_t: [N] -> series [N]."""
    series = {}
    for name, loss in _appendix_losses().items():
        x = x_t.double().clone().requires_grad_(True)
        loss(x).sum().backward()
        series[name] = x.grad.detach()
    return Curves("x_t", x_t.double(), series, "dL/dx")


# --------------------------------------------------------------------------------------------------------------
@dataclass
class ExampleRow:
    """The three losses of one example: y = 1 (foreground) or 0 (background) with foreground probability p."""

    p: float
    kind: str  # "foreground" | "background"
    p_t: float
    ce: float
    balanced_ce: float
    fl: float

    @property
    def ratio(self) -> float:
        """CE / FL: how much less the focal loss counts this example."""
        return self.ce / self.fl if self.fl > 0 else math.inf


def loss_examples(ps: Sequence[float], alpha: float = 0.25, gamma: float = 2.0) -> list[ExampleRow]:
    """Per p (the predicted probability of the foreground class, each in (0, 1)): the foreground's row, then the
    background's. CE, balanced CE (alpha) and FL (alpha, gamma), from retinanet.losses in float64."""
    for p in ps:
        if not 0 < p < 1:
            raise ValueError(f"examples: p = {p} must be strictly between 0 and 1")
    p_tensor = torch.tensor(list(ps), dtype=torch.float64)
    x = _logit(p_tensor)
    rows = []
    for i, p in enumerate(ps):
        for kind, y in (("foreground", 1.0), ("background", 0.0)):
            xi, t = x[i : i + 1], torch.full((1,), y, dtype=torch.float64)
            rows.append(
                ExampleRow(
                    p=float(p),
                    kind=kind,
                    p_t=p if y == 1 else 1.0 - p,
                    ce=float(binary_cross_entropy(xi, t)),
                    balanced_ce=float(binary_cross_entropy(xi, t, alpha=alpha)),
                    fl=float(sigmoid_focal_loss(xi, t, alpha=alpha, gamma=gamma)),
                )
            )
    return rows


def examples_table(rows: Sequence[ExampleRow], alpha: float = 0.25, gamma: float = 2.0) -> str:
    """The rows as a markdown table (the seed article's worked examples)."""
    lines = [
        f"| p (foreground) | example | p_t | CE | balanced CE (alpha {alpha:g}) "
        f"| FL (alpha {alpha:g}, gamma {gamma:g}) | CE / FL |",
        "|---:|:---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.p:g} | {r.kind} | {r.p_t:.4g} | {r.ce:.4g} | {r.balanced_ce:.4g} | {r.fl:.4g} | {r.ratio:.4g} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
def _save(curves: Curves, folder: Path, stem: str, title: str, ylim: tuple[float, float] | None) -> list[Path]:
    lines = {name: (curves.x.tolist(), y.tolist()) for name, y in curves.series.items()}
    xlim = (float(curves.x[0]), float(curves.x[-1]))
    panel = Panel(title, curves.x_name, curves.y_name, lines, xlim=xlim, ylim=ylim)
    png = save_line_plot(folder / f"{stem}.png", [panel], width_per_panel=6.0)
    csv = write_csv(folder / f"{stem}.csv", [curves.x_name, *curves.series], curves.rows())
    return [png, csv]


def write_loss_curves(folder: str | Path, points: int = 1000, x_t_max: float = 5.0) -> list[Path]:
    """Figures 1, 5 and 6 as PNG and CSV in `folder`: fig1_focal_loss (p_t = i / points, 0 < i < points),
    fig5_focal_loss_star and fig6_derivatives (x_t in [-x_t_max, x_t_max], points + 1 values)."""
    if points < 2 or x_t_max <= 0:
        raise ValueError(f"loss-curves: points must be >= 2 and x_t_max > 0, got {points} and {x_t_max}")
    folder = Path(folder)
    p_t = torch.arange(1, points, dtype=torch.float64) / points
    x_t = torch.linspace(-x_t_max, x_t_max, points + 1, dtype=torch.float64)
    files = _save(focal_loss_vs_pt(p_t), folder, "fig1_focal_loss", "Figure 1: focal loss", (0.0, 5.0))
    files += _save(focal_loss_star_vs_xt(x_t), folder, "fig5_focal_loss_star", "Figure 5: FL and FL*", (0.0, 5.0))
    files += _save(
        loss_derivatives_vs_xt(x_t), folder, "fig6_derivatives", "Figure 6: derivatives (y = +1)", (-1.25, 0.05)
    )
    return files
