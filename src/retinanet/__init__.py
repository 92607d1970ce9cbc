"""RetinaNet and the focal-loss family of "Focal Loss for Dense Object Detection" (Lin et al., 2017)."""

from retinanet.losses import (
    binary_cross_entropy,
    giou_loss,
    hard_negative_mining,
    l1_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_from_labels,
    sigmoid_focal_loss_star,
    smooth_l1_loss,
)

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy",
    "giou_loss",
    "hard_negative_mining",
    "l1_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_from_labels",
    "sigmoid_focal_loss_star",
    "smooth_l1_loss",
]
