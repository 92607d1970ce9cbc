"""Weights from elsewhere: torchvision's RetinaNet (v1, v2) as our model with the same detections, and
`model.init_from` (a checkpoint of ours, a torchvision file or torchvision's COCO download) with the classes
re-initialised or matched by name."""

from retinanet.weights.init_from import InitReport, Source, init_from, load_source
from retinanet.weights.torchvision import (
    TORCHVISION_COCO_WEIGHTS,
    from_torchvision,
    load_torchvision_coco,
    torchvision_config,
)

__all__ = [
    "TORCHVISION_COCO_WEIGHTS",
    "InitReport",
    "Source",
    "from_torchvision",
    "init_from",
    "load_source",
    "load_torchvision_coco",
    "torchvision_config",
]
