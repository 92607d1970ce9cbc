"""RetinaNet: backbone -> FPN -> shared subnets; `forward` gives head outputs, `loss` and `predict` the rest.

One image's way through: list of [3, H, W] images in [0, 1] -> normalise, resize (shorter side to min_size,
longer side at most max_size), pad into one batch -> backbone C3..C5 -> FPN P3..P7 -> head logits and deltas ->
(matching + losses) or (postprocess -> detections in the input image's pixels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from retinanet.config import CHOICES, ModelConfig, model_config
from retinanet.model.backbone import ResNetBody, build_backbone
from retinanet.model.conv import ALGORITHMS, Conv2d
from retinanet.model.fpn import FPN
from retinanet.model.head import RetinaNetHead
from retinanet.ops import box_losses, losses, ohem
from retinanet.ops.anchors import AnchorGenerator, anchor_generator
from retinanet.ops.boxes import first_invalid_box, paired_iou
from retinanet.ops.matching import BoxCoder, anchor_counts, atss_match_anchors, match_anchors
from retinanet.ops.postprocess import Detections, postprocess
from retinanet.ops.resize import padded_size, resize_image, resize_like_torchvision, resized_size
from retinanet.runtime.fastpath import RunFastPaths

__all__ = ["RetinaNet", "HeadOutputs", "Detections", "IOU_AWARE_LOSSES", "build_model"]

# classification losses whose positive targets are the IoU of the anchors' predicted boxes with their objects
IOU_AWARE_LOSSES = ("quality_focal", "varifocal")


class HeadOutputs(NamedTuple):
    """cls_logits [B, sum(HWA), K], box_deltas [B, sum(HWA), 4], and the (H, W) of each level's feature map."""

    cls_logits: Tensor
    box_deltas: Tensor
    grid_sizes: list[tuple[int, int]]


class Batch(NamedTuple):
    """A padded, normalised batch: images [B, 3, Hp, Wp]; per image the (h, w) inside the padding and the
    (scale_y, scale_x) from the input image to it."""

    images: Tensor
    image_sizes: list[tuple[int, int]]
    scales: list[tuple[float, float]]


class RetinaNet(nn.Module):
    """The detector of the paper. Build it with `build_model`; `config` holds every setting it was built from."""

    def __init__(
        self,
        *,
        backbone: ResNetBody,
        fpn: FPN,
        head: RetinaNetHead,
        anchor_generator: AnchorGenerator,
        box_coder: BoxCoder,
        config: ModelConfig,
    ):
        super().__init__()
        self.backbone, self.fpn, self.head = backbone, fpn, head
        self.anchor_generator, self.box_coder, self.config = anchor_generator, box_coder, config
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(3, 1, 1), persistent=False)
        # detectron2's moving-average loss normaliser (used when config.normalizer == "ema"); saved with the model
        self.register_buffer("loss_normalizer", torch.tensor(100.0))
        self.memory_format = "contiguous"  # build_from_config and fastpath.tune set it
        self.fast_paths: RunFastPaths | None = None  # its training run's measured choices (use_fast_paths)
        # gt boxes of the last loss's batch that no anchor at IoU >= fg_iou was given to: a tensor, read (a host
        # sync) only when the training loop logs it
        self.boxes_without_positive: Tensor | None = None
        # average the loss normaliser over DDP processes (the fast-path probe's copy, run on one process, does not)
        self.sync_normalizer = True

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    # ---------------------------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> HeadOutputs:
        """images: [B, 3, Hp, Wp] normalised, padded batch (see `preprocess`) -> the head's raw outputs."""
        if self.memory_format == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.fpn(self.backbone(images))
        cls_logits, box_deltas = self.head(features)
        return HeadOutputs(cls_logits, box_deltas, [tuple(f.shape[-2:]) for f in features])

    def use_memory_format(self, memory_format: str) -> "RetinaNet":
        """Run the convolutions in "channels_last" or "contiguous" layout (which is faster depends on the machine:
        `retinanet.runtime.fastpath.tune` measures it). Changes the layout of the parameters in place."""
        if memory_format not in ("channels_last", "contiguous"):
            raise ValueError(f"memory_format must be 'channels_last' or 'contiguous', got {memory_format!r}")
        if memory_format != self.memory_format:
            self.memory_format = memory_format
            self.to(memory_format=torch.channels_last if memory_format == "channels_last" else torch.contiguous_format)
        return self

    def use_fast_paths(self, fast_paths: RunFastPaths | None) -> "RetinaNet":
        """Take `fast_paths` (a training run's measured choices, retinanet.runtime.fastpath.begin_run) as this model's
        own: its convolutions ask them first, then the machine's cache (None: the cache alone)."""
        self.fast_paths = fast_paths
        self.backbone.fast_paths = fast_paths  # its folded convolutions
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.fast_paths = fast_paths
        return self

    def use_conv_algorithm(self, algorithm: str = "auto") -> "RetinaNet":
        """How the 3x3 convolutions of the head, the FPN outputs and the folded backbone are computed: "auto"
        (Winograd F(4x4, 3x3) where it is faster: large float32 convolutions on the CPU), "direct" (torch's
        convolution) or "winograd" (always, for the convolutions that are 3x3, stride 1)."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"conv_algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.algorithm = algorithm
        self.backbone.conv_algorithm = algorithm
        self.config = dataclasses.replace(self.config, conv_algorithm=algorithm)  # saved with checkpoints
        return self

    # ---------------------------------------------------------------------------------------------------------
    def preprocess(self, images: list[Tensor], resize: bool = True) -> Batch:
        """Resize each [3, H, W] float image in [0, 1] so that its shorter side is min_size and its longer at most
        max_size (retinanet.ops.resize, as the data transforms; skipped with resize=False), normalise it, and zero-pad
        all into one batch whose sides are multiples of size_divisible. With resize_antialias False (torchvision's
        models) it normalises first and resizes as torchvision does, for torchvision's exact detections."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of [3, H, W] float tensors")
        cfg = self.config
        resized, sizes, scales = [], [], []
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
                raise ValueError(f"image {i}: expected a float [3, H, W] tensor, got {img.dtype} {tuple(img.shape)}")
            h, w = img.shape[-2:]
            if resize and not cfg.resize_antialias:
                img = (img - self.pixel_mean.to(img)) / self.pixel_std.to(img)
                img = resize_like_torchvision(img, cfg.min_size, cfg.max_size)
            else:
                if resize:
                    img = resize_image(img, resized_size(h, w, cfg.min_size, cfg.max_size))
                img = (img - self.pixel_mean.to(img)) / self.pixel_std.to(img)
            resized.append(img)
            sizes.append((img.shape[-2], img.shape[-1]))
            scales.append((img.shape[-2] / h, img.shape[-1] / w))
        hp, wp = padded_size((max(s[0] for s in sizes), max(s[1] for s in sizes)), self.config.size_divisible)
        batch = resized[0].new_zeros((len(resized), 3, hp, wp))
        for b, img in zip(batch, resized):
            b[:, : img.shape[1], : img.shape[2]].copy_(img)
        return Batch(batch, sizes, scales)

    def anchors_per_level(self, head: HeadOutputs, batch_size_hw: tuple[int, int]) -> list[Tensor]:
        return self.anchor_generator.anchors_per_level(
            head.grid_sizes, batch_size_hw, device=head.cls_logits.device, dtype=torch.float32
        )

    # ---------------------------------------------------------------------------------------------------------
    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]], resize: bool = True) -> dict[str, Tensor]:
        """Training losses of a batch.

        Args:
            images: list of B float [3, H, W] tensors in [0, 1].
            targets: per image {"boxes": [N, 4] float XYXY pixels of that image, "labels": [N] int64 in 0..K-1,
                optionally "iscrowd": [N] bool (crowd regions are neither positive nor negative)}.
            resize: resize as in `preprocess` (boxes follow); False when the data pipeline already resized.
        Returns:
            {"loss_cls": scalar, "loss_box": scalar}: unweighted, each normalised by the number of positive anchors.
        """
        if len(images) != len(targets):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        targets = [_check_target(t, i, self.num_classes) for i, t in enumerate(targets)]
        batch = self.preprocess(images, resize)
        scaled = [_scale_target(t, sy, sx) for t, (sy, sx) in zip(targets, batch.scales)]
        head = self(batch.images)
        return self.compute_loss(head, scaled, tuple(batch.images.shape[-2:]))

    def compute_loss(
        self, head: HeadOutputs, targets: list[dict[str, Tensor]], batch_size_hw: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Losses from head outputs and targets already in the batch's pixel coordinates."""
        cfg = self.config
        per_level = self.anchors_per_level(head, batch_size_hw)
        anchors = torch.cat(per_level)
        labels, matched_boxes = self.assign(anchors, targets, [len(a) for a in per_level])  # [B, A], [B, A, 4]
        positive = labels >= 0
        normalizer = self._normalizer(positive.sum())
        img_idx, anchor_idx = torch.nonzero(positive, as_tuple=True)  # the step's one host-device sync here
        pred = head.box_deltas[img_idx, anchor_idx].float()
        pos_anchors, pos_boxes = anchors[anchor_idx], matched_boxes[img_idx, anchor_idx]
        decoded = self.box_coder.decode(pred, pos_anchors) if _decodes(cfg) else None
        box_loss = self._box_loss(pred, decoded, pos_anchors, pos_boxes) / normalizer
        quality = None
        if cfg.cls_loss in IOU_AWARE_LOSSES:  # the positives' targets: how well their predicted boxes fit
            quality = matched_boxes.new_zeros(labels.numel())
            quality[img_idx * labels.shape[1] + anchor_idx] = paired_iou(decoded.detach(), pos_boxes)
        cls_loss = self._classification_loss(head.cls_logits, labels, anchors, quality) / normalizer
        return {"loss_cls": cls_loss, "loss_box": cfg.box_loss_weight * box_loss}

    def assign(
        self, anchors: Tensor, targets: list[dict[str, Tensor]], num_per_level: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per image and anchor the class label (>= 0), BACKGROUND or IGNORE: [B, A] int64; and the gt box each
        anchor is matched to: [B, A, 4] float (meaningful where the label is >= 0). anchors: [A, 4], level after
        level (num_per_level anchors each: needed by the ATSS assigner; None: all one level). Gathers, not boolean
        indexing: no host-device sync per image."""
        cfg = self.config
        labels, boxes, uncovered = [], [], []
        for t in targets:
            if cfg.assigner == "atss":
                matched = atss_match_anchors(
                    anchors,
                    t["boxes"],
                    num_per_level or [anchors.shape[0]],
                    cfg.atss_topk,
                    self.anchor_generator.num_anchors_per_location(),
                    t.get("iscrowd"),
                )
            else:
                matched = match_anchors(
                    anchors, t["boxes"], cfg.fg_iou, cfg.bg_iou, cfg.allow_low_quality_matches, t.get("iscrowd")
                )
            if t["boxes"].numel():
                gt = matched.clamp(min=0)
                labels.append(torch.where(matched >= 0, t["labels"][gt], matched))
                boxes.append(t["boxes"][gt].float())
                # ATSS's positives need not reach fg_iou: there a box is uncovered when it has no anchor at all
                fg_iou = 0.0 if cfg.assigner == "atss" else cfg.fg_iou
                uncovered.append(_boxes_without_positive(matched, anchors, t, fg_iou))
            else:
                labels.append(matched)
                boxes.append(anchors.new_zeros((anchors.shape[0], 4), dtype=torch.float32))
        none = torch.zeros((), dtype=torch.int64, device=anchors.device)
        self.boxes_without_positive = torch.stack(uncovered).sum() if uncovered else none
        return torch.stack(labels), torch.stack(boxes)

    def _normalizer(self, num_pos: Tensor) -> Tensor:
        """The number of positive anchors in the batch (at least 1): the paper's normaliser; averaged over DDP
        processes; or its exponential moving average (detectron2) with normalizer="ema"."""
        num_pos = num_pos.float()
        if self.sync_normalizer and dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_pos)
            num_pos = num_pos / dist.get_world_size()
        if self.config.normalizer == "ema":
            if self.training:
                m = self.config.normalizer_momentum
                self.loss_normalizer.mul_(m).add_((1 - m) * num_pos.clamp(min=1).detach())
            return self.loss_normalizer.clone()
        return num_pos.clamp(min=1.0)

    def _classification_loss(
        self, cls_logits: Tensor, labels: Tensor, anchors: Tensor, quality: Tensor | None = None
    ) -> Tensor:
        cfg = self.config
        logits = cls_logits.reshape(-1, cls_logits.shape[-1])
        flat = labels.reshape(-1)
        kind = cfg.cls_loss
        if kind == "focal":
            return losses.sigmoid_focal_loss_from_labels(logits, flat, cfg.alpha, cfg.gamma)
        if kind == "focal_star":
            return losses.sigmoid_focal_loss_from_labels(
                logits, flat, cfg.alpha, cfg.gamma, loss="focal_star", beta=cfg.beta
            )
        if kind == "quality_focal":
            return losses.sigmoid_focal_loss_from_labels(
                logits, flat, loss=kind, beta=cfg.quality_beta, quality=quality
            )
        if kind == "varifocal":
            return losses.sigmoid_focal_loss_from_labels(
                logits, flat, cfg.varifocal_alpha, cfg.varifocal_gamma, loss=kind, quality=quality
            )
        if kind == "ce":
            return losses.sigmoid_focal_loss_from_labels(logits, flat, alpha=-1.0, gamma=0.0)
        if kind == "balanced_ce":
            return losses.sigmoid_focal_loss_from_labels(logits, flat, alpha=cfg.alpha, gamma=0.0)
        if kind == "ohem":
            per_image = [
                ohem.ohem_loss_from_labels(
                    lg, lb, cfg.ohem_budget, cfg.ohem_neg_pos_ratio, anchors=anchors, nms_thresh=cfg.ohem_nms_thresh
                )
                for lg, lb in zip(cls_logits, labels)
            ]
            return torch.stack(per_image).sum()
        raise ValueError(f"unknown cls_loss {kind!r}: use one of {list(CHOICES['cls_loss'])}")

    def _box_loss(self, pred_deltas: Tensor, decoded: Tensor | None, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """The box loss of the positives: on their deltas (smooth L1, L1) or their decoded boxes (the IoU family)."""
        cfg = self.config
        if cfg.box_loss in box_losses.IOU_LOSSES:
            return box_losses.IOU_LOSSES[cfg.box_loss](decoded, gt_boxes)
        target = self.box_coder.encode(anchors, gt_boxes)
        if cfg.box_loss == "smooth_l1":
            return box_losses.smooth_l1_loss(pred_deltas, target, beta=cfg.smooth_l1_beta)
        if cfg.box_loss == "l1":
            return box_losses.l1_loss(pred_deltas, target)
        raise ValueError(f"unknown box_loss {cfg.box_loss!r}: use one of {list(CHOICES['box_loss'])}")

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: list[Tensor], resize: bool = True, score_thresh: float | None = None) -> list[Detections]:
        """Detections per image, boxes in that input image's pixels (call `model.eval()` first).

        images: list of float [3, H, W] tensors in [0, 1]. Returns one Detections(boxes [N, 4], scores [N],
        labels [N]) per image, at most detections_per_image, by decreasing score, each above score_thresh (default:
        the config's)."""
        batch = self.preprocess(images, resize)
        head = self(batch.images)
        return self.postprocess(head, batch, score_thresh)

    def postprocess(self, head: HeadOutputs, batch: Batch, score_thresh: float | None = None) -> list[Detections]:
        cfg = self.config
        anchors = self.anchors_per_level(head, tuple(batch.images.shape[-2:]))
        dets = postprocess(
            head.cls_logits,
            head.box_deltas,
            anchors,
            batch.image_sizes,
            self.box_coder,
            cfg.score_thresh if score_thresh is None else score_thresh,
            cfg.topk_candidates,
            cfg.nms_thresh,
            cfg.detections_per_image,
        )
        return [_unscale(d, sy, sx) for d, (sy, sx) in zip(dets, batch.scales)]


def _decodes(cfg: ModelConfig) -> bool:
    """Whether the loss needs the positives' decoded boxes: for an IoU box loss or an IoU-aware class target."""
    return cfg.box_loss in box_losses.IOU_LOSSES or cfg.cls_loss in IOU_AWARE_LOSSES


def _check_target(t: dict[str, Tensor], index: int, num_classes: int) -> dict[str, Tensor]:
    boxes, labels = t.get("boxes"), t.get("labels")
    if boxes is None or labels is None:
        raise ValueError(f"target {index}: needs 'boxes' [N, 4] and 'labels' [N]")
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) if boxes.numel() == 0 else boxes
    if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"target {index}: boxes must be [N, 4] and labels [N], got {tuple(boxes.shape)}, {tuple(labels.shape)}"
        )
    found = first_invalid_box(boxes)
    if found is not None:
        j, why = found
        raise ValueError(f"target {index}, box {j}: {boxes[j].tolist()} {why}; expected XYXY with x2 > x1, y2 > y1")
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        j = int(torch.nonzero(out_of_range)[0])
        raise ValueError(f"target {index}, box {j}: label {int(labels[j])} is not in 0..{num_classes - 1}")
    return {**t, "boxes": boxes, "labels": labels.long()}


def _scale_target(t: dict[str, Tensor], sy: float, sx: float) -> dict[str, Tensor]:
    if sy == 1.0 and sx == 1.0:
        return t
    scale = torch.tensor([sx, sy, sx, sy], dtype=t["boxes"].dtype, device=t["boxes"].device)
    return {**t, "boxes": t["boxes"] * scale}


def _unscale(d: Detections, sy: float, sx: float) -> Detections:
    if sy == 1.0 and sx == 1.0:
        return d
    scale = torch.tensor([1 / sx, 1 / sy, 1 / sx, 1 / sy], dtype=d.boxes.dtype, device=d.boxes.device)
    return Detections(d.boxes * scale, d.scores, d.labels)


def _boxes_without_positive(matched: Tensor, anchors: Tensor, target: dict[str, Tensor], fg_iou: float) -> Tensor:
    """Scalar int64: the image's non-crowd gt boxes given no anchor at IoU >= fg_iou (anchor_tools' coverage)."""
    positive, _ = anchor_counts(matched, anchors, target["boxes"], fg_iou)
    crowd = target.get("iscrowd")
    missing = positive == 0
    return (missing & ~crowd.bool()).sum() if crowd is not None else missing.sum()


def build_from_config(cfg: ModelConfig) -> RetinaNet:
    """The single builder: a ModelConfig -> modules -> RetinaNet. Memory format "auto" starts as channels-last
    until `retinanet.runtime.fastpath.tune` measures which is faster on the machine; "auto" backbone norm and freezing
    follow from whether the backbone is pretrained (ModelConfig.resolved)."""
    cfg = cfg.check().resolved()
    backbone = build_backbone(
        cfg.backbone,
        cfg.backbone_weights,
        cfg.backbone_norm,
        cfg.frozen_bn_eps,
        cfg.freeze_at,
        cfg.fold_frozen_bn,
        cfg.backbone_width,
    )
    fpn = FPN(backbone.out_channels, cfg.fpn_channels, cfg.p6_from)
    anchors = anchor_generator(cfg)
    head = RetinaNetHead(
        cfg.fpn_channels,
        anchors.num_anchors_per_location(),
        cfg.num_classes,
        cfg.head_channels,
        cfg.head_convs,
        cfg.head_norm,
        cfg.prior_prob,
    )
    model = RetinaNet(
        backbone=backbone,
        fpn=fpn,
        head=head,
        anchor_generator=anchors,
        box_coder=BoxCoder(cfg.box_coder_weights, cfg.box_clamp),
        config=cfg,
    )
    layout = "channels_last" if cfg.memory_format == "auto" else cfg.memory_format
    return model.use_memory_format(layout).use_conv_algorithm(cfg.conv_algorithm)


def build_model(name: str = "retinanet_r50_fpn", **overrides: Any) -> RetinaNet:
    """`build_model("retinanet_r50_fpn", num_classes=80, min_size=800, max_size=1333)`: the preset `name` with
    keyword overrides of any ModelConfig field (backbone, fpn_channels, head_channels, anchor_scales,
    aspect_ratios, cls_loss, alpha, gamma, fg_iou, detections_per_image, ...)."""
    return build_from_config(model_config(name, **overrides))
