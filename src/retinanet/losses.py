"""The losses of the paper, in one public module (`from retinanet import losses`): the focal-loss family (CE,
balanced CE, FL, FL*; retinanet.ops.losses), the box regression losses (retinanet.ops.box_losses) and hard-negative
mining, the paper's OHEM baseline (retinanet.ops.ohem)."""

from retinanet.ops.box_losses import giou_loss, l1_loss, smooth_l1_loss
from retinanet.ops.losses import (
    binary_cross_entropy,
    set_loss_backend,
    sigmoid_focal_loss,
    sigmoid_focal_loss_from_labels,
    sigmoid_focal_loss_star,
)
from retinanet.ops.ohem import hard_negative_mining, ohem_loss_from_labels

__all__ = [
    "binary_cross_entropy",
    "giou_loss",
    "hard_negative_mining",
    "l1_loss",
    "ohem_loss_from_labels",
    "set_loss_backend",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_from_labels",
    "sigmoid_focal_loss_star",
    "smooth_l1_loss",
]
