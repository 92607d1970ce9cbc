"""The losses of the paper and their successors, in one public module (`from retinanet import losses`): the
focal-loss family (CE, balanced CE, FL, FL*) and the IoU-aware QFL and VFL (retinanet.ops.losses), the box regression
losses (smooth L1, L1, GIoU, DIoU, CIoU: retinanet.ops.box_losses) and hard-negative mining, the paper's OHEM baseline
(retinanet.ops.ohem)."""

from retinanet.ops.box_losses import ciou_loss, diou_loss, giou_loss, l1_loss, smooth_l1_loss
from retinanet.ops.losses import (
    binary_cross_entropy,
    quality_focal_loss,
    set_loss_backend,
    sigmoid_focal_loss,
    sigmoid_focal_loss_from_labels,
    sigmoid_focal_loss_star,
    varifocal_loss,
)
from retinanet.ops.ohem import hard_negative_mining, ohem_loss_from_labels

__all__ = [
    "binary_cross_entropy",
    "ciou_loss",
    "diou_loss",
    "giou_loss",
    "hard_negative_mining",
    "l1_loss",
    "ohem_loss_from_labels",
    "quality_focal_loss",
    "set_loss_backend",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_from_labels",
    "sigmoid_focal_loss_star",
    "smooth_l1_loss",
    "varifocal_loss",
]
