"""The model's settings (ModelConfig), its presets by name, and the rules every user of a saved config shares.

`build_model` (retinanet.model) turns a ModelConfig into modules. Presets are ModelConfig instances; keyword
overrides replace any field, and an unknown key, a value of the wrong type or one outside its choices is an error
that names the key and where it came from (a file, the command line).

The model config holds everything a checkpoint needs to be used the way it was trained, the image sizes among
them: training, evaluation, detection, the predictor and export all resize by `min_size`, `max_size` and (training
only) `train_min_sizes`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinanet.config.checked import Checked, apply_overrides, config_to_dict

__all__ = ["CHOICES", "PRESETS", "TORCHVISION_DETECTORS", "ModelConfig", "model_config", "size_overrides"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the settings that take one of a few values (None where the field may also be None)
CHOICES: dict[str, tuple] = {
    "backbone": ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext101_32x8d"),
    "backbone_norm": ("auto", "frozen_bn", "bn"),
    "conv_algorithm": ("auto", "direct", "winograd"),
    "memory_format": ("auto", "channels_last", "contiguous"),
    "p6_from": ("c5", "p5"),
    "head_norm": (None, "gn"),
    "cls_loss": ("focal", "focal_star", "ce", "balanced_ce", "ohem", "quality_focal", "varifocal"),
    "box_loss": ("smooth_l1", "l1", "giou", "diou", "ciou"),
    "assigner": ("iou", "atss"),
    "normalizer": ("positives", "ema"),
    "init_classes": ("reinit", "match"),
}
# the torchvision detectors whose COCO weights `init_from: torchvision:NAME` downloads
TORCHVISION_DETECTORS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")


@dataclass
class ModelConfig(Checked):
    """Every setting of the detector. Defaults are the paper's RetinaNet (ResNet-50-FPN, 800 px)."""

    WHERE = "model config"

    num_classes: int = 80
    # the dataset's categories, kept with the model so that outputs carry names and original ids (optional)
    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()
    # backbone
    backbone: str = "resnet50"
    backbone_weights: str | None = None  # None, "imagenet" (torchvision download) or a local state-dict path
    # a whole detector to start from (retinanet.weights.init_from): a checkpoint of ours, a torchvision RetinaNet
    # state-dict file (v1 or v2), or "torchvision:retinanet_resnet50_fpn[_v2]" (COCO weights, downloaded once). With
    # other classes the last classification layer starts again from the prior: init_classes "reinit" for all of them,
    # "match" keeps the rows of the classes whose names the source has
    init_from: str | None = None
    init_classes: str = "reinit"
    # "frozen_bn" (the paper, for ImageNet-initialised backbones), "bn" (trainable) or "auto": frozen_bn when the
    # backbone starts from pretrained weights, bn from scratch, where frozen statistics of a random network
    # normalise nothing and training diverges (resolved() writes the choice into the config a checkpoint keeps)
    backbone_norm: str = "auto"
    backbone_width: int | None = None  # channels of the stem and first stage, doubling per stage; None: 64
    frozen_bn_eps: float = 1e-5
    freeze_at: int | None = None  # 2: stem + layer1 frozen (Detectron, pretrained); None: 2 pretrained, 0 from scratch
    fold_frozen_bn: bool = True  # frozen BatchNorm folded into the convolutions (faster; same function up to rounding)
    # fast paths that depend on the machine (retinanet.runtime.fastpath): "auto" measures which is faster here, once per
    # machine and shape class. 3x3 convolutions: "auto", "direct" (torch's) or "winograd" (retinanet.ops.winograd);
    # memory layout: "auto", "channels_last" or "contiguous"
    conv_algorithm: str = "auto"
    memory_format: str = "auto"
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
    # assigning anchors to objects: "iou" (the paper's thresholds below) or "atss" (each object's anchors picked by
    # the statistics of the IoU of its atss_topk nearest per level, retinanet.ops.matching.atss_match_anchors)
    assigner: str = "iou"
    atss_topk: int = 9
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    allow_low_quality_matches: bool = True
    box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    box_clamp: float = math.log(1000.0 / 16)
    # losses: the paper's family (focal | focal_star | ce | balanced_ce | ohem) or its IoU-aware successors, whose
    # positive target is the IoU of the anchor's predicted box with its object (quality_focal: GFL's QFL, varifocal:
    # VarifocalNet's VFL), so that scores rank boxes by how well they fit
    cls_loss: str = "focal"
    alpha: float = 0.25
    gamma: float = 2.0
    beta: float = 1.0  # FL* only
    quality_beta: float = 2.0  # QFL's exponent on |IoU - p|
    varifocal_alpha: float = 0.75  # VFL's weight of the negatives...
    varifocal_gamma: float = 2.0  # ...and their focusing exponent
    ohem_budget: int = 128  # anchors per image kept by OHEM (the paper's best OHEM: 128 with NMS 0.5)
    ohem_nms_thresh: float | None = 0.5  # NMS over the scored anchors before picking the hardest (None: off)
    ohem_neg_pos_ratio: float | None = None  # e.g. 3.0 for SSD's 1:3
    box_loss: str = "smooth_l1"  # smooth_l1 | l1 (on deltas) | giou | diou | ciou (on decoded boxes)
    smooth_l1_beta: float = 0.11  # Detectron's value
    box_loss_weight: float = 1.0
    normalizer: str = "positives"  # positives (the paper) | ema (detectron2's moving average)
    normalizer_momentum: float = 0.9
    # input: every image is resized so that its shorter side is min_size and its longer side at most max_size
    # (evaluation, detection, export; training too unless train_min_sizes is set, whose sizes are drawn one per image
    # for multi-scale training), then padded to a multiple of size_divisible
    min_size: int = 800
    max_size: int = 1333
    train_min_sizes: tuple[int, ...] = ()
    size_divisible: int = 32
    resize_antialias: bool = True  # False: torchvision's resize (normalise, then bilinear without antialiasing)
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

    @classmethod
    def from_saved(cls, saved: dict[str, Any], where: str) -> "ModelConfig":
        """The config a checkpoint or an exported file was saved with, to rebuild its model: the weights come with
        it, so the files or downloads the model was first initialised from (backbone_weights, init_from) are not
        needed."""
        return cls.from_dict({**saved, "backbone_weights": None, "init_from": None}, where)

    @property
    def pretrained(self) -> bool:
        """Whether the weights start from elsewhere: an ImageNet backbone or a detector to initialise from."""
        return self.backbone_weights not in (None, "none") or bool(getattr(self, "init_from", None))

    def resolved(self) -> "ModelConfig":
        """A copy with the "auto" settings that shape the modules made concrete: backbone_norm and freeze_at follow
        from whether the weights are pretrained. The model keeps (and a checkpoint saves) this copy, so that
        rebuilding it from a checkpoint gives the same modules."""
        norm = self.backbone_norm if self.backbone_norm != "auto" else ("frozen_bn" if self.pretrained else "bn")
        freeze_at = self.freeze_at if self.freeze_at is not None else (2 if self.pretrained else 0)
        return dataclasses.replace(self, backbone_norm=norm, freeze_at=freeze_at)

    @property
    def training_sizes(self) -> tuple[int, ...]:
        """The shorter sides drawn from in training: train_min_sizes, or min_size alone."""
        return tuple(self.train_min_sizes) or (self.min_size,)

    def problems(self) -> list[str]:
        """What is wrong with these values, as 'key: why' sentences (empty when nothing is)."""
        out = [
            f"{k} = {getattr(self, k)!r} is not one of {list(v)}"
            for k, v in CHOICES.items()
            if getattr(self, k) not in v
        ]
        checks = [
            ("num_classes", self.num_classes >= 1, "must be at least 1"),
            (
                "class_names",
                not self.class_names or len(self.class_names) == self.num_classes,
                f"has {len(self.class_names)} names for {self.num_classes} classes",
            ),
            (
                "category_ids",
                not self.category_ids or len(self.category_ids) == self.num_classes,
                f"has {len(self.category_ids)} ids for {self.num_classes} classes",
            ),
            (
                "backbone_width",
                self.backbone_width is None
                or (isinstance(self.backbone_width, int) and self.backbone_width >= 8 and self.backbone_width % 8 == 0),
                "must be a multiple of 8 (or None: the architecture's 64)",
            ),
            (
                "freeze_at",
                self.freeze_at is None or (isinstance(self.freeze_at, int) and 0 <= self.freeze_at <= 5),
                "must be in 0..5 (or None: 2 with pretrained weights, 0 from scratch)",
            ),
            ("prior_prob", 0 < self.prior_prob < 1, "must be in (0, 1)"),
            ("fg_iou", 0 < self.bg_iou <= self.fg_iou <= 1, f"needs 0 < bg_iou ({self.bg_iou}) <= fg_iou <= 1"),
            ("alpha", self.alpha < 0 or self.alpha <= 1, "must be in [0, 1] (or negative: no weighting)"),
            ("gamma", self.gamma >= 0, "must be >= 0"),
            ("quality_beta", self.quality_beta >= 0, "must be >= 0"),
            (
                "varifocal_alpha",
                self.varifocal_alpha >= 0 and self.varifocal_gamma >= 0,
                "and varifocal_gamma must be >= 0",
            ),
            ("atss_topk", self.atss_topk >= 1, "must be >= 1"),
            ("min_size", self.min_size >= 1 and self.max_size >= 1, "and max_size must be >= 1"),
            ("train_min_sizes", all(s >= 1 for s in self.train_min_sizes), "must be >= 1"),
            ("size_divisible", self.size_divisible >= 1, "must be >= 1"),
            ("head_channels", self.head_channels >= 1 and self.fpn_channels >= 1, "channels must be >= 1"),
            ("head_convs", self.head_convs >= 0, "must be >= 0"),
            (
                "anchor_sizes",
                all(s > 0 for s in self.anchor_sizes)
                and all(s > 0 for s in self.anchor_scales)
                and all(r > 0 for r in self.aspect_ratios),
                "anchor sizes, scales and aspect ratios must be > 0",
            ),
            ("score_thresh", 0 <= self.score_thresh < 1, "must be in [0, 1)"),
            ("nms_thresh", 0 < self.nms_thresh <= 1, "must be in (0, 1]"),
            (
                "detections_per_image",
                self.detections_per_image >= 1 and self.topk_candidates >= 1,
                "detections_per_image and topk_candidates must be >= 1",
            ),
        ]
        out += [f"{key} {why}" for key, ok, why in checks if not ok]
        weights = self.backbone_weights
        if weights not in (None, "none", "imagenet") and not Path(weights).is_file():
            out.append(f"backbone_weights: file not found: {weights} (expected None, 'imagenet' or a state-dict file)")
        source = self.init_from
        if source is not None and not isinstance(source, str):
            out.append(f"init_from = {source!r} is not a string (a file or torchvision:NAME)")
        elif source is not None and source.startswith("torchvision:"):
            if source.partition(":")[2] not in TORCHVISION_DETECTORS:
                out.append(
                    f"init_from: unknown torchvision detector {source!r}; expected one of "
                    f"{['torchvision:' + n for n in TORCHVISION_DETECTORS]}"
                )
        elif source is not None and not Path(source).is_file():
            out.append(
                f"init_from: file not found: {source} (expected a checkpoint, a torchvision RetinaNet "
                "state-dict file or torchvision:retinanet_resnet50_fpn[_v2])"
            )
        return out


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
for _name, _preset in PRESETS.items():
    _preset.check(f"model preset {_name!r}")


def model_config(name: str = "retinanet_r50_fpn", where: str | None = None, **overrides: Any) -> ModelConfig:
    """The preset `name` with keyword overrides of any of its fields; errors name `where` (default: the preset)."""
    if name not in PRESETS:
        raise ValueError(f"{where or 'model config'}: unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return apply_overrides(PRESETS[name], overrides, where or f"model preset {name!r}")


def size_overrides(min_size: int | None = None, max_size: int | None = None) -> dict[str, int]:
    """The resize settings given (on a command line, to a predictor), as ModelConfig overrides: those not None."""
    return {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
