"""Typed configuration: the model's settings, presets by name, and YAML in and out.

A config is plain dataclasses; `build_model` (detector.py) turns a ModelConfig into modules. Presets are
ModelConfig instances; keyword overrides replace any field, and an unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ModelConfig", "PRESETS", "model_config", "apply_overrides", "config_to_dict"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """Every setting of the detector. Defaults are the paper's RetinaNet (ResNet-50-FPN, 800 px)."""

    num_classes: int = 80
    # the dataset's categories, kept with the model so that outputs carry names and original ids (optional)
    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()
    # backbone
    backbone: str = "resnet50"
    backbone_weights: str | None = None  # None, "imagenet" (torchvision download) or a local state-dict path
    backbone_norm: str = "frozen_bn"  # "frozen_bn" | "bn"
    frozen_bn_eps: float = 1e-5
    freeze_at: int = 2  # stem + layer1 frozen (Detectron)
    fold_frozen_bn: bool = True  # frozen BatchNorm folded into the convolutions (faster; same function up to rounding)
    # 3x3 convolutions: "auto" computes the large ones (head, FPN outputs, folded backbone) by Winograd F(4x4, 3x3)
    # on the CPU in float32, where it is faster (retinanet.winograd); "direct": always torch's convolution
    conv_algorithm: str = "auto"
    # FPN and head
    fpn_channels: int = 256
    p6_from: str = "c5"  # "c5" (paper) | "p5" (torchvision v1)
    head_channels: int = 256
    head_convs: int = 4
    head_norm: str | None = None  # None | "gn"
    prior_prob: float = 0.01
    # anchors: per level base size x scales, aspect ratios (h / w)
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    anchor_scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.5  # anchor centres at (x + offset) * stride
    anchor_sizes_per_level: tuple[tuple[float, ...], ...] | None = None  # explicit sizes; overrides sizes x scales
    anchor_round_base: bool = False
    anchor_strides_from_image: bool = False  # torchvision: stride = padded size // grid size
    # matching and box coding
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    allow_low_quality_matches: bool = True
    box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    box_clamp: float = math.log(1000.0 / 16)
    # losses
    cls_loss: str = "focal"  # focal | focal_star | ce | balanced_ce | ohem
    alpha: float = 0.25
    gamma: float = 2.0
    beta: float = 1.0  # FL* only
    ohem_budget: int = 128  # anchors per image kept by OHEM (the paper's best OHEM: 128 with NMS 0.5)
    ohem_nms_thresh: float | None = 0.5  # NMS over the scored anchors before picking the hardest (None: off)
    ohem_neg_pos_ratio: float | None = None  # e.g. 3.0 for SSD's 1:3
    box_loss: str = "smooth_l1"  # smooth_l1 | l1 | giou
    smooth_l1_beta: float = 0.11  # Detectron's value
    box_loss_weight: float = 1.0
    normalizer: str = "positives"  # positives (the paper) | ema (detectron2's moving average)
    normalizer_momentum: float = 0.9
    # input
    min_size: int = 800
    max_size: int = 1333
    size_divisible: int = 128
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    # inference
    score_thresh: float = 0.05
    topk_candidates: int = 1000
    nms_thresh: float = 0.5
    detections_per_image: int = 100

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model config") -> "ModelConfig":
        return apply_overrides(cls(), data, where)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML/JSON-ready values (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def apply_overrides(config: Any, overrides: dict[str, Any], where: str = "config") -> Any:
    """A copy of dataclass `config` with `overrides` applied; a key that is not a field raises ValueError naming it.
    Lists become tuples where the field is a tuple."""
    names = {f.name for f in fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    values = {}
    for k, v in overrides.items():
        current = getattr(config, k)
        if isinstance(v, list) and (isinstance(current, tuple) or current is None):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        values[k] = _checked(where, k, v, current)
    return dataclasses.replace(config, **values)


def _checked(where: str, key: str, value: Any, current: Any) -> Any:
    """`value` if it has the kind of the field's current value (ints pass as floats), else a ValueError naming the
    key; fields whose current value is None take anything."""
    ok = True
    if current is None or value is None:
        ok = True
    elif isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, (str, tuple)):
        ok = isinstance(value, type(current))
    if not ok:
        raise ValueError(f"{where}: {key} = {value!r} is not a {type(current).__name__} like its default {current!r}")
    return value


PRESETS: dict[str, ModelConfig] = {
    # the paper's model
    "retinanet_r50_fpn": ModelConfig(),
    "retinanet_r101_fpn": ModelConfig(backbone="resnet101"),
    "retinanet_x101_32x8d_fpn": ModelConfig(backbone="resnext101_32x8d"),
    "retinanet_r18_fpn": ModelConfig(backbone="resnet18"),
    # trains in minutes on a 2-core CPU: a one-block-per-stage ResNet with trainable BatchNorm (no ImageNet
    # weights exist for it), a narrow FPN and head, small images; anchors start at 16 px for small objects
    "retinanet_tiny": ModelConfig(
        backbone="resnet10",
        backbone_norm="bn",
        freeze_at=0,
        fpn_channels=64,
        head_channels=64,
        head_convs=2,
        head_norm="gn",
        anchor_sizes=(16, 32, 64, 128, 256),
        min_size=256,
        max_size=256,
        smooth_l1_beta=0.0,
    ),
}


def model_config(name: str = "retinanet_r50_fpn", **overrides: Any) -> ModelConfig:
    """The preset `name` with keyword overrides of any of its fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return apply_overrides(PRESETS[name], overrides, f"model preset {name!r}")
