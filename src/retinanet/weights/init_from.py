"""Starting a detector from another detector's weights (`model.init_from`).

    report = init_from(model, "runs/coco/last.pt")                      # a checkpoint of ours
    report = init_from(model, "retinanet_resnet50_fpn_coco.pth")        # a torchvision RetinaNet state dict (v1, v2)
    report = init_from(model, "torchvision:retinanet_resnet50_fpn_v2")  # torchvision's COCO weights, downloaded once
    print("\\n".join(report.lines()))

Everything whose shape the two models share is loaded: backbone, FPN, both subnets' towers and the box layer. The
last classification layer (A x K outputs, channel a * K + k) is loaded too when the classes are the same; with other
classes it starts again as a new head does (weights N(0, 0.01), bias at the prior pi), except, with
init_classes="match", the rows of this model's classes whose names the source has (COCO's names for torchvision's
weights), which are copied. When the anchors per location differ, both final layers start again. Any other
difference (another backbone, P6 source, head width or norm) is an error that names the config keys to change.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision.models.detection as tvd
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

from retinanet.config import TORCHVISION_DETECTORS, ModelConfig
from retinanet.model import RetinaNet, load_checkpoint, model_weights, saved_model_config
from retinanet.runtime.downloads import fetch_state_dict
from retinanet.weights.torchvision import TORCHVISION_COCO_WEIGHTS, from_torchvision

__all__ = ["InitReport", "Source", "init_from", "load_source"]

# the config keys that shape the modules whose weights are loaded: they must agree with the source's
ARCHITECTURE = ("backbone", "backbone_width", "fpn_channels", "p6_from", "head_channels", "head_convs", "head_norm")
ANCHORS = (
    "anchor_sizes",
    "anchor_scales",
    "aspect_ratios",
    "anchor_sizes_per_level",
    "anchor_offset",
    "anchor_round_base",
    "anchor_strides_from_image",
)
CLASS_LAYER = ("head.cls_logits.weight", "head.cls_logits.bias")
BOX_LAYER = ("head.box_deltas.weight", "head.box_deltas.bias")
# buffers that are not weights: the loss normaliser's running value and BatchNorm's step counter
NOT_WEIGHTS = re.compile(r"(^loss_normalizer$|num_batches_tracked$)")
# torchvision's COCO names for unused category ids, which match no class
UNUSED_NAMES = {"__background__", "N/A"}


@dataclass
class Source:
    """Weights to start from: state (our key layout), config (the model they belong to, as our ModelConfig),
    class_names (by label; empty when unknown) and how to name them in the log."""

    state: dict[str, Tensor]
    config: ModelConfig
    class_names: tuple[str, ...]
    description: str

    @property
    def num_classes(self) -> int:
        return self.config.num_classes


@dataclass
class InitReport:
    """What init_from did: the groups of weights loaded unchanged, those started again, the classes whose rows
    were copied (ours, the source's) and those that start from the prior, and notes worth knowing."""

    source: str
    loaded: list[str] = field(default_factory=list)
    tensors: int = 0
    reinitialised: list[str] = field(default_factory=list)
    kept_classes: list[tuple[str, str]] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as log lines, one per fact."""
        out = [f"init_from {self.source}: loaded {', '.join(self.loaded)} ({self.tensors} tensors)"]
        out += [f"init_from: re-initialised {what}" for what in self.reinitialised]
        if self.kept_classes:
            kept = ", ".join(a if a == b else f"{a} <- {b}" for a, b in self.kept_classes)
            new = f"; new: {', '.join(self.new_classes)}" if self.new_classes else ""
            out.append(f"init_from: classification rows kept for {len(self.kept_classes)} classes ({kept}){new}")
        out += [f"init_from: note: {note}" for note in self.notes]
        return out


# ------------------------------------------------------------------------------------------------------------------
# sources


def load_source(spec: str) -> Source:
    """A checkpoint of ours, a torchvision RetinaNet state-dict file, or "torchvision:NAME" (downloaded)."""
    if spec.startswith("torchvision:"):
        return _torchvision_download(spec.partition(":")[2])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"model.init_from: file not found: {spec}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, in one line
        raise ValueError(f"model.init_from: {spec} is not a readable weights file ({type(exc).__name__})") from None
    if isinstance(state, dict) and "format_version" in state:
        return _our_checkpoint(path)
    if isinstance(state, dict) and "backbone.fpn.extra_blocks.p6.weight" in state:
        return _torchvision_state(state, f"{spec} (torchvision RetinaNet)")
    raise ValueError(
        f"model.init_from: {spec} is neither a checkpoint written by `retinanet train` nor a "
        "torchvision RetinaNet state dict"
    )


def _our_checkpoint(path: Path) -> Source:
    checkpoint = load_checkpoint(path)
    config = saved_model_config(checkpoint, f"model.init_from: {path}")
    return Source(
        model_weights(checkpoint),
        config,
        tuple(config.class_names),
        f"{path} (iteration {checkpoint['iteration']}, {config.num_classes} classes)",
    )


def _torchvision_state(state: dict[str, Tensor], description: str) -> Source:
    """Converted through retinanet.weights.torchvision (which also reads torchvision's older key layouts)."""
    converted = from_torchvision(state)
    names: tuple[str, ...] = ()
    coco = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # v1 and v2 share COCO's 91 ids
    if converted.num_classes == len(coco):
        names = tuple(coco)
    version = "v1" if converted.config.p6_from == "p5" else "v2"
    return Source(
        converted.state_dict(), converted.config, names, f"{description}, {version}, {converted.num_classes} classes"
    )


def _torchvision_download(name: str) -> Source:
    if name not in TORCHVISION_DETECTORS:
        raise ValueError(
            f"model.init_from: unknown torchvision detector {name!r}; expected one of "
            f"{['torchvision:' + n for n in TORCHVISION_DETECTORS]}"
        )
    weights = getattr(tvd, TORCHVISION_COCO_WEIGHTS[name][0]).COCO_V1
    state = fetch_state_dict(
        weights, f"torchvision's {name} COCO weights", f"set model.init_from to its path ({Path(weights.url).name})"
    )
    return _torchvision_state(state, f"torchvision:{name} (COCO)")


# ------------------------------------------------------------------------------------------------------------------
# loading


def init_from(model: RetinaNet, spec: str | Source | None = None, init_classes: str | None = None) -> InitReport:
    """Load the weights of `spec` (default: model.config.init_from) into `model` as the module docstring says.

    init_classes: "reinit" or "match" (default: model.config.init_classes). Returns the report; raises ValueError
    naming the config keys to change when the source's modules do not fit this model."""
    cfg = model.config
    spec = spec if spec is not None else cfg.init_from
    if spec is None:
        raise ValueError("init_from: no source given and model.init_from is not set")
    mode = init_classes or cfg.init_classes
    if mode not in ("reinit", "match"):
        raise ValueError(f"model.init_classes = {mode!r} is not one of ['reinit', 'match']")
    source = spec if isinstance(spec, Source) else load_source(spec)
    report = InitReport(source.description)
    _check_fit(source, model.state_dict(), cfg)
    pairs = _class_pairs(cfg, source) if mode == "match" else []  # before anything changes: it may raise
    same_anchors = _anchors_per_location(source) == model.head.num_anchors
    _load_shared(model, source, same_anchors, report)
    if not same_anchors:
        _new_box_layer(model.head.box_deltas)
        report.reinitialised.append(
            f"head.box_deltas (the source has {_anchors_per_location(source)} anchors "
            f"per location, this model {model.head.num_anchors})"
        )
    _class_layer(model, source, mode, pairs if same_anchors else [], report)
    report.notes += _notes(source.config, cfg)
    return report


def _load_shared(model: RetinaNet, source: Source, same_anchors: bool, report: InitReport) -> None:
    """Copy every weight but the final layers' (the box layer's too, with the same anchors per location)."""
    for key, value in model.state_dict().items():  # the state dict's tensors share the parameters' storage
        if NOT_WEIGHTS.search(key) or key in CLASS_LAYER or (key in BOX_LAYER and not same_anchors):
            continue
        value.copy_(source.state[key])
        report.tensors += 1
        _add_group(report.loaded, key)


def _group(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "head" else parts[0]


def _add_group(groups: list[str], key: str) -> None:
    if _group(key) not in groups:
        groups.append(_group(key))


def _check_fit(source: Source, state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """ValueError listing what does not fit (keys missing on either side, shapes) and the config keys to change."""
    theirs = {k for k in source.state if not NOT_WEIGHTS.search(k)}
    ours = {k for k in state if not NOT_WEIGHTS.search(k)}
    free = set(CLASS_LAYER) | set(BOX_LAYER)  # these may differ in shape: they start again
    problems = [f"{k} is missing in the source" for k in sorted(ours - theirs)]
    problems += [f"{k} is not in this model" for k in sorted(theirs - ours)]
    problems += [
        f"{k} is {list(source.state[k].shape)} there, {list(state[k].shape)} here"
        for k in sorted(ours & theirs - free)
        if source.state[k].shape != state[k].shape
    ]
    if not problems:
        return
    differ = [
        f"model.{k}: {getattr(source.config, k)!r}"
        for k in ARCHITECTURE
        if getattr(source.config, k) != getattr(cfg, k)
    ]
    hint = f"; set {', '.join(differ)} to build the source's architecture" if differ else ""
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise ValueError(
        f"model.init_from: {source.description} does not fit this model: {'; '.join(problems[:3])}{more}{hint}"
    )


def _anchors_per_location(source: Source) -> int:
    return source.state[BOX_LAYER[1]].shape[0] // 4


def _new_box_layer(conv: nn.Conv2d) -> None:
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)


def _class_layer(model: RetinaNet, source: Source, mode: str, pairs: list[tuple[int, int]], report: InitReport) -> None:
    """Copy, partly copy (the rows of `pairs`: our label, the source's) or start again the last classification
    layer."""
    cfg, conv = model.config, model.head.cls_logits
    ours_k, theirs_k = cfg.num_classes, source.num_classes
    weight, bias = source.state[CLASS_LAYER[0]], source.state[CLASS_LAYER[1]]
    same_anchors = weight.shape[0] // theirs_k == model.head.num_anchors
    if same_anchors and mode == "reinit" and ours_k == theirs_k:
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        report.loaded.append("head.cls_logits")
        report.tensors += 2
        if source.class_names and cfg.class_names and tuple(source.class_names) != tuple(cfg.class_names):
            report.notes.append(
                f"the source's classes {list(source.class_names)} differ from this model's "
                f"{list(cfg.class_names)}: kept by index (model.init_classes=match pairs them by "
                "name)"
            )
        return
    _new_class_layer(conv, cfg.prior_prob)
    a = model.head.num_anchors
    with torch.no_grad():
        for ours, theirs in pairs:  # channel a * K + k holds class k of anchor type a
            conv.weight[torch.arange(a) * ours_k + ours] = weight[torch.arange(a) * theirs_k + theirs]
            conv.bias[torch.arange(a) * ours_k + ours] = bias[torch.arange(a) * theirs_k + theirs]
    names = cfg.class_names or tuple(str(k) for k in range(ours_k))
    report.kept_classes = [(names[o], source.class_names[t]) for o, t in pairs]
    report.new_classes = [names[k] for k in range(ours_k) if k not in {o for o, _ in pairs}] if pairs else []
    fresh = ours_k - len(pairs)
    why = (
        f"the source has {theirs_k} classes"
        if same_anchors
        else f"the source has {_anchors_per_location(source)} anchors per location"
    )
    report.reinitialised.append(
        f"head.cls_logits for {fresh} of {ours_k} classes with the prior {cfg.prior_prob:g} ({why})"
    )


def _new_class_layer(conv: nn.Conv2d, prior_prob: float) -> None:
    """As a new head: weights N(0, 0.01), bias -log((1 - pi) / pi) so every anchor starts at confidence pi."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, -math.log((1 - prior_prob) / prior_prob))


def _normalised(name: str) -> str:
    """Names compared without case, and with '_' and '-' as spaces: 'Traffic_Light' pairs with 'traffic light'."""
    return " ".join(re.sub(r"[_\-]", " ", name).lower().split())


def _class_pairs(cfg: ModelConfig, source: Source) -> list[tuple[int, int]]:
    """(our label, the source's label) for each of our classes whose name the source has."""
    if not cfg.class_names:
        raise ValueError(
            "model.init_classes=match needs this model's class names (model.class_names; training sets "
            "them from the data)"
        )
    if not source.class_names:
        raise ValueError(
            f"model.init_classes=match: {source.description} carries no class names to match; use "
            "model.init_classes=reinit"
        )
    theirs = {_normalised(n): i for i, n in reversed(list(enumerate(source.class_names))) if n not in UNUSED_NAMES}
    return [(k, theirs[_normalised(n)]) for k, n in enumerate(cfg.class_names) if _normalised(n) in theirs]


def _notes(theirs: ModelConfig, ours: ModelConfig) -> list[str]:
    """Differences that load fine but change what the weights compute."""
    notes = []
    anchors = [k for k in ANCHORS if _plain(getattr(theirs, k)) != _plain(getattr(ours, k))]
    if anchors:
        notes.append(
            f"the source's anchors differ in {anchors}: the box layer starts from boxes relative to other "
            "anchors and adapts in training"
        )
    frozen = theirs.resolved().backbone_norm == "frozen_bn" and ours.resolved().backbone_norm == "frozen_bn"
    if frozen and theirs.frozen_bn_eps != ours.frozen_bn_eps:
        notes.append(
            f"the source's frozen BatchNorm eps is {theirs.frozen_bn_eps:g}, this model's "
            f"{ours.frozen_bn_eps:g} (model.frozen_bn_eps={theirs.frozen_bn_eps:g} computes the source's "
            "function exactly)"
        )
    if theirs.pixel_mean != ours.pixel_mean or theirs.pixel_std != ours.pixel_std:
        notes.append("the source normalises pixels by another mean / std (model.pixel_mean, model.pixel_std)")
    if ours.backbone_weights not in (None, "none"):
        notes.append(
            f"model.backbone_weights ({ours.backbone_weights}) were replaced by the source's backbone: "
            "leave it unset to skip loading them"
        )
    return notes


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
