"""RetinaNet and the focal-loss family of "Focal Loss for Dense Object Detection" (Lin et al., 2017)."""

from retinanet.config import ModelConfig, model_config
from retinanet.detector import RetinaNet, build_model
from retinanet.interop import from_torchvision, load_torchvision_coco
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

from retinanet.postprocess import Detections  # noqa: E402
from retinanet.predictor import Predictor, load  # noqa: E402  (retinanet.load("runs/x/last.pt").predict(...))

__all__ = [
    "Detections",
    "ModelConfig",
    "Predictor",
    "RetinaNet",
    "build_model",
    "from_torchvision",
    "load",
    "load_torchvision_coco",
    "model_config",
    "binary_cross_entropy",
    "giou_loss",
    "hard_negative_mining",
    "l1_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_from_labels",
    "sigmoid_focal_loss_star",
    "smooth_l1_loss",
]
