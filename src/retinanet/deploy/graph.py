"""ONNX export of the inference model.

    retinanet export --checkpoint runs/x/last.pt --output model.onnx                  # dynamic batch and size
    retinanet export --checkpoint runs/x/last.pt --output model.onnx --image-size 800 1344

The graph holds all of inference after the resize: normalisation, backbone, FPN, head and the paper's
post-processing exactly as `retinanet.ops.postprocess` does it (per level the top k (anchor, class) pairs, the score
threshold, decoding, clipping; class-wise NMS by ONNX NonMaxSuppression; the top N per image), so that an engine
(retinanet.deploy.engines) returns the detections our PyTorch model returns. The resize stays on the host, because
antialiased resizing has no ONNX operator that engines agree on.

    inputs   images       [B, 3, H, W] float32 in [0, 1]: each image resized as evaluation resizes it, at the top
                          left, zero-padded; H and W multiples of the model's size_divisible (32)
             image_sizes  [B, 2] int64: each image's (h, w) inside the padding (boxes are clipped to it)
    outputs  boxes        [B, D, 4] float32 XYXY in the input's pixels
             scores       [B, D] float32
             labels       [B, D] int64 in 0..K-1
             num_detections [B] int64: image b's detections are its first num_detections[b] rows, by decreasing
                          score; the rows after them are zeros with label -1. D = detections_per_image.

The model's config (sizes, thresholds, class names and ids) travels in the file's metadata ("retinanet.config"),
so that a runner needs the .onnx file alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from retinanet.config import ModelConfig, config_to_dict
from retinanet.inference.predictor import categories_of
from retinanet.model import RetinaNet
from retinanet.ops.anchors import AnchorGenerator
from retinanet.runtime.outputs import atomic_path, writing

__all__ = ["DEFAULT_OPSET", "INPUT_NAMES", "OUTPUT_NAMES", "InferenceGraph", "export_onnx", "read_metadata", "require"]

MIN_OPSET = 17
DEFAULT_OPSET = 18
FORMAT_VERSION = "1"
INPUT_NAMES = ["images", "image_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]
_EXTRAS = {
    "onnx": "retinanet[onnx]",
    "onnxscript": "retinanet[onnx]",
    "onnxruntime": "retinanet[onnx]",
    "openvino": "retinanet[openvino]",
}


def require(package: str) -> Any:
    """The module `package`, or a one-line ValueError naming it and the pip extra that installs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(
            f"{package} is not installed: pip install {package} (or pip install '{_EXTRAS.get(package, package)}')"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# Class-wise NMS as one operator: ONNX NonMaxSuppression in the graph, torchvision's NMS when run in PyTorch.
@torch.library.custom_op("retinanet::nms_per_class", mutates_args=())
def nms_per_class(boxes: Tensor, class_scores: Tensor, max_per_class: int, iou_threshold: float) -> Tensor:
    """ONNX NonMaxSuppression's contract. boxes [B, N, 4] float XYXY; class_scores [B, C, N] float, a candidate
    taking part in class c's NMS where its score there is > 0. Returns the kept [M, 3] int64 (image, class, box),
    at most max_per_class per (image, class)."""
    out = [boxes.new_zeros((0, 3), dtype=torch.int64)]
    for b in range(boxes.shape[0]):
        cls, idx = torch.nonzero(class_scores[b] > 0, as_tuple=True)
        keep = batched_nms(boxes[b, idx], class_scores[b, cls, idx], cls, iou_threshold)  # by decreasing score
        cls, idx = cls[keep], idx[keep]
        order = torch.sort(cls, stable=True).indices  # by class, still by decreasing score within a class
        cls, idx = cls[order], idx[order]
        rank = torch.arange(len(cls)) - torch.searchsorted(cls, cls)  # position within its class
        cls, idx = cls[rank < max_per_class], idx[rank < max_per_class]
        out.append(torch.stack((torch.full_like(cls, b), cls, idx), dim=1))
    return torch.cat(out)


@nms_per_class.register_fake
def _(boxes: Tensor, class_scores: Tensor, max_per_class: int, iou_threshold: float) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept, 3), dtype=torch.int64)


def _nms_to_onnx(boxes, class_scores, max_per_class: int, iou_threshold: float):
    from onnxscript import opset17 as op

    # score_threshold 0: ONNX keeps candidates whose score is > it, ours have their score or exactly 0
    return op.NonMaxSuppression(
        boxes,
        class_scores,
        op.Constant(value_ints=[max_per_class]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[0.0]),
    )


# ----------------------------------------------------------------------------------------------------------------
class InferenceGraph(nn.Module):
    """What is exported: a RetinaNet from a normalised-on-the-fly padded batch to fixed-size detections (see the
    module docstring for the inputs and outputs). Run in PyTorch it gives the model's own detections; it exists to
    be traced, so every size in it is a tensor shape, never a Python number read from data."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model
        cfg = model.config
        self.num_classes, self.cfg = cfg.num_classes, cfg

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model, head = self.model, self.model.head
        features = model.fpn(model.backbone(self._normalised(images, image_sizes)))
        # the head level by level, as RetinaNetHead.forward computes it but without concatenating the levels: per
        # level shapes keep the traced size arithmetic simple (slicing a concatenation is many times slower to export)
        cls_per_level = [head.level_outputs(f)[0] for f in features]
        box_per_level = [head.level_outputs(f)[1] for f in features]
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = _anchors_per_level(model.anchor_generator, grid_sizes, images.shape[-2:])
        boxes, scores, labels = self._candidates(cls_per_level, box_per_level, anchors, image_sizes)
        return self._detections(boxes, scores, labels)

    def _normalised(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """(images - mean) / std with the padding zero, as `RetinaNet.preprocess` pads after normalising."""
        model = self.model
        ys = torch.arange(images.shape[2], device=images.device)
        xs = torch.arange(images.shape[3], device=images.device)
        inside = (ys[None, :, None] < image_sizes[:, 0, None, None]) & (
            xs[None, None, :] < image_sizes[:, 1, None, None]
        )
        return (images - model.pixel_mean) / model.pixel_std * inside[:, None].to(images.dtype)

    def _candidates(
        self,
        cls_per_level: list[Tensor],
        box_per_level: list[Tensor],
        anchors_per_level: list[Tensor],
        image_sizes: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per level the top-k (anchor, class) pairs, decoded and clipped: boxes [B, N, 4], scores [B, N] (0 where
        the score is not above the threshold), labels [B, N]; N = sum over levels of min(k, pairs of the level)."""
        cfg, k = self.cfg, self.cfg.topk_candidates
        boxes_all, scores_all, labels_all = [], [], []
        for cls_logits, box_deltas, anchors in zip(cls_per_level, box_per_level, anchors_per_level):
            logits, pair = _topk_pairs_traceable(cls_logits, k)
            scores = torch.sigmoid(logits.float())
            anchor_idx = pair // self.num_classes
            deltas = box_deltas.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))
            boxes_all.append(self.model.box_coder.decode(deltas, anchors[anchor_idx]))
            scores_all.append(torch.where(scores > cfg.score_thresh, scores, torch.zeros_like(scores)))
            labels_all.append(pair % self.num_classes)
        boxes = torch.cat(boxes_all, 1)
        size = image_sizes.to(boxes.dtype)[:, None, :]  # [B, 1, 2] (h, w)
        x = boxes[..., 0::2].clamp(min=0).minimum(size[..., 1:2])
        y = boxes[..., 1::2].clamp(min=0).minimum(size[..., 0:1])
        boxes = torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
        return boxes, torch.cat(scores_all, 1), torch.cat(labels_all, 1)

    def _detections(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Class-wise NMS, then the top D per image by score, padded (see the module docstring)."""
        cfg, num = self.cfg, scores.shape[1]
        classes = torch.arange(self.num_classes, device=labels.device)
        class_scores = torch.where(
            labels[:, None, :] == classes[None, :, None], scores[:, None, :], torch.zeros_like(scores[:, None, :])
        )  # [B, K, N]
        # a class keeps at most D: the top D of the image could not take more of one class
        kept = torch.ops.retinanet.nms_per_class(boxes, class_scores, cfg.detections_per_image, cfg.nms_thresh)
        image, box = kept[:, 0], kept[:, 2]
        kept_scores = torch.zeros_like(scores).index_put((image, box), scores[image, box])
        top_scores, top = kept_scores.topk(torch.sym_min(cfg.detections_per_image, num), dim=1)
        found = top_scores > 0
        top_boxes = boxes.gather(1, top.unsqueeze(-1).expand(-1, -1, 4)) * found.unsqueeze(-1).to(boxes.dtype)
        top_labels = torch.where(found, labels.gather(1, top), torch.full_like(top, -1))
        return top_boxes, top_scores, top_labels, found.sum(1)


def _topk_pairs_traceable(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`postprocess._topk_pairs` without its branch on the number of anchors, so that one graph serves every image
    size: the k best anchors by their best class (all of them when there are fewer), then the k best of their
    (anchor, class) pairs. logits [B, A, K] -> values [B, k'] and flat indices anchor * K + class [B, k']."""
    batch, num_anchors, num_classes = logits.shape
    best = logits.amax(dim=2).topk(torch.sym_min(k, num_anchors), dim=1).indices
    candidates = logits.gather(1, best.unsqueeze(-1).expand(-1, -1, num_classes)).reshape(batch, -1)
    values, idx = candidates.topk(torch.sym_min(k, candidates.shape[1]), dim=1)
    return values, best.gather(1, idx // num_classes) * num_classes + idx % num_classes


def _anchors_per_level(generator: AnchorGenerator, grid_sizes: list[tuple[Any, Any]], padded_hw) -> list[Tensor]:
    """The generator's anchors for traced (symbolic) grid sizes: its own per-level rule, without the cache that
    would fix them to one size. Strides: the generator's, or padded size // grid size (torchvision's rule)."""
    levels = []
    for level, ((gh, gw), base) in enumerate(zip(grid_sizes, generator.base_anchors_per_level)):
        if generator.strides is not None:
            stride = (generator.strides[level], generator.strides[level])
        else:
            stride = (padded_hw[0] // gh, padded_hw[1] // gw)
        levels.append(generator.level_anchors(base, (gh, gw), stride).to(torch.float32))
    return levels


# ----------------------------------------------------------------------------------------------------------------
def export_onnx(
    model: RetinaNet,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    image_size: tuple[int, int] | None = None,
    categories: list[dict[str, Any]] | None = None,
) -> Path:
    """Write `model`'s inference graph (see the module docstring) to `path` as one ONNX file, and check it with
    onnx.checker. image_size (H, W): a graph for that padded input size only (multiples of size_divisible);
    None: any size. The batch size is dynamic either way. Returns the path."""
    require("onnx")
    require("onnxscript")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset}: export needs opset {MIN_OPSET} or later")
    cfg = model.config
    d = cfg.size_divisible
    if image_size is not None and (len(image_size) != 2 or any(s < d or s % d for s in image_size)):
        raise ValueError(
            f"image size {tuple(image_size)}: height and width must be multiples of {d} (the model's "
            f"size_divisible), at least {d}"
        )
    graph = InferenceGraph(_exportable_copy(model)).eval()
    height, width = image_size or (2 * d * 4, 3 * d * 4)  # any example size: the dims are marked dynamic
    images = torch.rand(2, 3, height, width)
    sizes = torch.tensor([[height, width], [height - d, width - d]], dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=1024)
    dims: dict[str, Any] = {"images": {0: batch}, "image_sizes": {0: batch}}
    if image_size is None:
        dims["images"].update(
            {
                2: d * torch.export.Dim("height_blocks", min=1, max=16384 // d),
                3: d * torch.export.Dim("width_blocks", min=1, max=16384 // d),
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), _quiet("onnx_ir"):
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # the batch dim named twice
        program = torch.onnx.export(
            graph,
            (images, sizes),
            dynamic_shapes=dims,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
            custom_translation_table={torch.ops.retinanet.nms_per_class.default: _nms_to_onnx},
        )
    program.model.metadata_props.update(_metadata(cfg, categories or categories_of(model), image_size))
    import onnx

    with atomic_path(path) as written:  # a failed write or check leaves an earlier export whole
        with writing(path):
            program.save(str(written), external_data=False)
        onnx.checker.check_model(str(written), full_check=True)
    return path


@contextlib.contextmanager
def _quiet(logger_name: str):
    """The exporter's libraries log warnings meant for their developers (an empty attribute list defaulted to
    INTS): keep them off the user's screen while exporting."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _exportable_copy(model: RetinaNet) -> RetinaNet:
    """A copy with plain convolutions (the engines bring their own fast ones; Winograd is a custom autograd
    function no exporter can read) in the contiguous layout, in eval mode, on the CPU."""
    out = copy.deepcopy(model).cpu().eval()
    return out.use_conv_algorithm("direct").use_memory_format("contiguous")


def _metadata(cfg: ModelConfig, categories: list[dict[str, Any]], image_size: tuple[int, int] | None) -> dict[str, str]:
    return {
        "retinanet.format_version": FORMAT_VERSION,
        "retinanet.config": json.dumps(config_to_dict(cfg)),
        "retinanet.categories": json.dumps(categories),
        "retinanet.image_size": json.dumps(list(image_size) if image_size else None),
    }


def read_metadata(path: str | Path) -> tuple[ModelConfig, list[dict[str, Any]], tuple[int, int] | None]:
    """(model config, categories, fixed input size or None) stored in an exported file by `export_onnx`."""
    onnx = require("onnx")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: ONNX file not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a file that is not a model
        raise ValueError(f"{path}: cannot read the ONNX model ({exc})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if "retinanet.config" not in meta:
        raise ValueError(f"{path}: not exported by `retinanet export` (no retinanet.config in its metadata)")
    cfg = ModelConfig.from_saved(json.loads(meta["retinanet.config"]), where=f"{path}: retinanet.config")
    size = json.loads(meta.get("retinanet.image_size", "null"))
    return cfg, json.loads(meta["retinanet.categories"]), tuple(size) if size else None
