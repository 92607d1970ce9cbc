"""The detector: the convolution dispatch (asks retinanet.runtime.fastpath), ResNet backbone, FPN, the shared head,
RetinaNet itself (forward, loss, predict), and checkpoint files."""

from retinanet.model.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_model,
    model_weights,
    save_checkpoint,
    saved_model_config,
)
from retinanet.model.detector import Batch, HeadOutputs, RetinaNet, build_from_config, build_model

__all__ = [
    "FORMAT_VERSION",
    "Batch",
    "HeadOutputs",
    "RetinaNet",
    "build_from_config",
    "build_model",
    "load_checkpoint",
    "load_model",
    "model_weights",
    "save_checkpoint",
    "saved_model_config",
]
