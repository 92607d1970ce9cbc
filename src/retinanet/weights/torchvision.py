"""torchvision's RetinaNet in and out: its weights in our model, giving the same detections.

`from_torchvision(module_or_state_dict)` takes a torchvision `retinanet_resnet50_fpn` (v1) or
`retinanet_resnet50_fpn_v2` module or state dict, including the layout of torchvision's published COCO checkpoint,
and returns our RetinaNet set up to do what torchvision does: its anchor sizes and rounding, strides taken from the
padded batch, padding to a multiple of 32, its P6 source, its resize settings and 300 detections per image.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retinanet.config import ModelConfig, apply_overrides
from retinanet.model.detector import RetinaNet, build_from_config
from retinanet.ops.anchors import TORCHVISION_SIZES_PER_LEVEL
from retinanet.runtime.downloads import fetch_state_dict

__all__ = ["from_torchvision", "torchvision_config", "load_torchvision_coco", "TORCHVISION_COCO_WEIGHTS"]

TORCHVISION_COCO_WEIGHTS = {
    "retinanet_resnet50_fpn": ("RetinaNet_ResNet50_FPN_Weights", "v1"),
    "retinanet_resnet50_fpn_v2": ("RetinaNet_ResNet50_FPN_V2_Weights", "v2"),
}


def torchvision_config(
    version: str,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    norm: str = "frozen_bn",
    frozen_bn_eps: float = 0.0,
    **overrides: Any,
) -> ModelConfig:
    """Our ModelConfig for torchvision's RetinaNet v1 (P6 from P5, plain head, L1 box loss) or v2 (P6 from C5,
    GroupNorm head, GIoU loss)."""
    if version not in ("v1", "v2"):
        raise ValueError(f"torchvision RetinaNet version must be 'v1' or 'v2', got {version!r}")
    cfg = ModelConfig(
        num_classes=num_classes,
        backbone="resnet50",
        backbone_norm=norm,
        frozen_bn_eps=frozen_bn_eps,
        freeze_at=2,  # torchvision's trainable_backbone_layers=3 for pretrained backbones
        fold_frozen_bn=False,  # torchvision's order of operations, so that rounding matches too
        conv_algorithm="direct",  # torchvision's convolutions, for the same reason
        memory_format="contiguous",  # and its memory layout, so that near-tied detections match exactly
        p6_from="p5" if version == "v1" else "c5",
        head_norm=None if version == "v1" else "gn",
        anchor_sizes_per_level=TORCHVISION_SIZES_PER_LEVEL,
        anchor_round_base=True,
        anchor_offset=0.0,
        anchor_strides_from_image=True,
        allow_low_quality_matches=True,
        box_loss="l1" if version == "v1" else "giou",
        min_size=min_size,
        max_size=max_size,
        size_divisible=32,
        resize_antialias=False,
        detections_per_image=300,
    )
    return apply_overrides(cfg, overrides, "torchvision config")


def _detect_version(state: dict[str, torch.Tensor]) -> str:
    p6 = state.get("backbone.fpn.extra_blocks.p6.weight")
    if p6 is None:
        raise ValueError("not a torchvision RetinaNet state dict: 'backbone.fpn.extra_blocks.p6.weight' is missing")
    return "v1" if p6.shape[1] == 256 else "v2"


def _torchvision_module(state: dict[str, torch.Tensor], version: str) -> nn.Module:
    """A torchvision RetinaNet of the right variant with `state` loaded by torchvision's own code, which also
    upgrades the older key layouts of its published checkpoints."""
    from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
    from torchvision.ops.misc import FrozenBatchNorm2d

    cls_weight = next(v for k, v in state.items() if k.endswith("classification_head.cls_logits.weight"))
    num_classes = cls_weight.shape[0] // 9
    build = retinanet_resnet50_fpn if version == "v1" else retinanet_resnet50_fpn_v2
    module = build(weights=None, weights_backbone=None, num_classes=num_classes)
    if not any(k.endswith("num_batches_tracked") for k in state):
        # a checkpoint of a model with frozen BatchNorm (the published ones): give the module the same layers
        _replace_bn(module.backbone.body, FrozenBatchNorm2d)
    module.load_state_dict(state)
    return module


def _replace_bn(module: nn.Module, frozen_cls) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, frozen_cls(child.num_features))
        else:
            _replace_bn(child, frozen_cls)


# torchvision key -> our key (after the module has been loaded, so the keys are torchvision's current layout)
_RENAMES = [
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", r"fpn.lateral.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", r"fpn.output.\1."),
    (r"^backbone\.fpn\.extra_blocks\.(p6|p7)\.", r"fpn.\1."),
    (r"^head\.classification_head\.cls_logits\.", "head.cls_logits."),
    (r"^head\.regression_head\.bbox_reg\.", "head.box_deltas."),
]


def _head_tower_key(key: str, stride: int) -> str | None:
    """head.{classification,regression}_head.conv.{i}.{0 conv | 1 GroupNorm}.* -> head.{cls,box}_tower.{j}.*"""
    m = re.match(r"^head\.(classification|regression)_head\.conv\.(\d)\.(\d)\.(.*)$", key)
    if not m:
        return None
    tower = "cls_tower" if m.group(1) == "classification" else "box_tower"
    return f"head.{tower}.{int(m.group(2)) * stride + int(m.group(3))}.{m.group(4)}"


def _convert_state(tv_state: dict[str, torch.Tensor], version: str) -> dict[str, torch.Tensor]:
    stride = 2 if version == "v1" else 3  # our tower: conv, ReLU (v1) or conv, GroupNorm, ReLU (v2)
    out = {}
    for key, value in tv_state.items():
        if key.startswith("anchor_generator") or key.startswith("transform"):
            continue
        new = _head_tower_key(key, stride)
        if new is None:
            new = key
            for pattern, repl in _RENAMES:
                new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def from_torchvision(module_or_state_dict: nn.Module | dict[str, torch.Tensor], **overrides: Any) -> RetinaNet:
    """Our RetinaNet with the weights of a torchvision RetinaNet (v1 `retinanet_resnet50_fpn` or
    `retinanet_resnet50_fpn_v2`), set up to give the same detections.

    Args:
        module_or_state_dict: a torchvision RetinaNet module (its min_size/max_size, thresholds and detections per
            image are copied) or its state dict (torchvision's defaults 800/1333 are used), such as the published
            COCO checkpoint (FrozenBatchNorm2d with eps 0 for v1, no `num_batches_tracked`).
        overrides: any ModelConfig field to change afterwards (e.g. detections_per_image).
    """
    settings: dict[str, Any] = {}
    if isinstance(module_or_state_dict, nn.Module):
        module = module_or_state_dict
        state = module.state_dict()
        version = _detect_version(state)
        t = module.transform
        settings = dict(
            min_size=int(t.min_size[-1]),
            max_size=int(t.max_size),
            score_thresh=float(module.score_thresh),
            nms_thresh=float(module.nms_thresh),
            detections_per_image=int(module.detections_per_img),
            topk_candidates=int(module.topk_candidates),
            pixel_mean=tuple(t.image_mean),
            pixel_std=tuple(t.image_std),
        )
    else:
        version = _detect_version(module_or_state_dict)
        module = _torchvision_module(dict(module_or_state_dict), version)
        state = module.state_dict()
    bn = module.backbone.body.bn1
    frozen = not isinstance(bn, nn.BatchNorm2d)
    eps = float(getattr(bn, "eps", 1e-5))
    if frozen and not isinstance(module_or_state_dict, nn.Module) and version == "v1":
        eps = 0.0  # torchvision loads its published v1 weights with overwrite_eps(model, 0.0)
    num_classes = state["head.classification_head.cls_logits.weight"].shape[0] // 9
    cfg = torchvision_config(
        version, num_classes, norm="frozen_bn" if frozen else "bn", frozen_bn_eps=eps, **{**settings, **overrides}
    )
    model = build_from_config(cfg)
    ours = _convert_state(state, version)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if k != "loss_normalizer"]
    if missing or unexpected:
        raise ValueError(f"torchvision weights do not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model


def load_torchvision_coco(
    name: str = "retinanet_resnet50_fpn", weights_path: str | Path | None = None, **overrides: Any
) -> tuple[RetinaNet, list[dict[str, Any]]]:
    """torchvision's published COCO RetinaNet as our model, with the COCO categories.

    Args:
        name: "retinanet_resnet50_fpn" (v1, 36.4 box AP) or "retinanet_resnet50_fpn_v2" (41.5 box AP), or the
            path of a downloaded checkpoint of either.
        weights_path: a local copy of the checkpoint; None downloads it through torchvision's weights mechanism
            (needs a connection the first time, then torch hub's cache).
    Returns:
        (model, categories) where label i of the model is COCO category id i, named as torchvision names it
        ("__background__" and "N/A" for the unused ids).
    """
    import torchvision.models.detection as tvd

    if name not in TORCHVISION_COCO_WEIGHTS and weights_path is None and Path(name).is_file():
        # a downloaded checkpoint file: v1 or v2 is read from its weights; both have the same COCO categories
        name, weights_path = "retinanet_resnet50_fpn", name
    if name not in TORCHVISION_COCO_WEIGHTS:
        raise ValueError(f"unknown torchvision RetinaNet {name!r}; choose one of {sorted(TORCHVISION_COCO_WEIGHTS)}")
    enum_name, _ = TORCHVISION_COCO_WEIGHTS[name]
    weights = getattr(tvd, enum_name).COCO_V1
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise ValueError(f"torchvision weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = fetch_state_dict(
            weights,
            f"torchvision's {name} COCO weights",
            f"pass its path (retinanet detect --torchvision {Path(weights.url).name})",
        )
    model = from_torchvision(state, **overrides)
    categories = [{"id": i, "name": n} for i, n in enumerate(weights.meta["categories"])]
    return model, categories
