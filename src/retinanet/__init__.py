"""RetinaNet and the focal-loss family of "Focal Loss for Dense Object Detection" (Lin et al., 2017).

    import retinanet
    model = retinanet.build_model("retinanet_r50_fpn", num_classes=80)   # the detector (retinanet.model)
    det = retinanet.load("runs/x/last.pt")                               # a trained one, as a Predictor
    from retinanet import losses                                         # the focal-loss family

The package is built in layers, each importing only from those below it (docs/architecture.md). Its public names
are loaded when first used, so that `import retinanet` (and `retinanet --help`) does not load torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# OpenMP threads that wait for work sleep instead of spinning (before torch loads its OpenMP runtime, which reads
# this once): two processes on the same cores (a training and an evaluation, two ablation cells, a detection server
# beside a notebook) then share them, 1.7x the time of one alone for two trainings on 2 cores, where spinning
# threads took 7.5x (benchmarks/bench_shared_cores.py); one alone was no slower. OMP_WAIT_POLICY=ACTIVE restores it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> the module it lives in
_PUBLIC = {
    "Detections": "retinanet.ops.postprocess",
    "ModelConfig": "retinanet.config",
    "Predictor": "retinanet.inference",
    "RetinaNet": "retinanet.model",
    "binary_cross_entropy": "retinanet.losses",
    "build_model": "retinanet.model",
    "ciou_loss": "retinanet.losses",
    "diou_loss": "retinanet.losses",
    "from_torchvision": "retinanet.weights",
    "giou_loss": "retinanet.losses",
    "hard_negative_mining": "retinanet.losses",
    "l1_loss": "retinanet.losses",
    "load": "retinanet.inference",
    "load_torchvision_coco": "retinanet.weights",
    "model_config": "retinanet.config",
    "quality_focal_loss": "retinanet.losses",
    "sigmoid_focal_loss": "retinanet.losses",
    "sigmoid_focal_loss_from_labels": "retinanet.losses",
    "sigmoid_focal_loss_star": "retinanet.losses",
    "smooth_l1_loss": "retinanet.losses",
    "varifocal_loss": "retinanet.losses",
}
__all__ = sorted([*_PUBLIC, "losses"])


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name == "losses":  # `retinanet.losses` after a bare `import retinanet`
        value = importlib.import_module(f"retinanet.{name}")
    else:
        raise AttributeError(f"module 'retinanet' has no attribute {name!r}")
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
