"""Typed configuration, checked at load: the model (ModelConfig and its presets), training (TrainConfig), data
(DataConfig) and a whole run (RunConfig: YAML in and out, dotted command-line overrides). The lowest layer: it
imports nothing else of the package."""

from retinanet.config.checked import Checked, apply_overrides, config_to_dict
from retinanet.config.data import FORMATS, DataConfig
from retinanet.config.model import CHOICES, PRESETS, TORCHVISION_DETECTORS, ModelConfig, model_config, size_overrides
from retinanet.config.run import RunConfig, load_run_config, parse_overrides, run_config_from_dict, save_run_config
from retinanet.config.train import AMP_MODES, OPTIMIZERS, Schedule, TrainConfig, train_config

__all__ = [
    "AMP_MODES",
    "CHOICES",
    "FORMATS",
    "OPTIMIZERS",
    "PRESETS",
    "TORCHVISION_DETECTORS",
    "Checked",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "Schedule",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "load_run_config",
    "model_config",
    "parse_overrides",
    "run_config_from_dict",
    "save_run_config",
    "size_overrides",
    "train_config",
]
