"""ONNX export of the inference model, and the engines that run it on a CPU: ONNX Runtime and OpenVINO.

    retinanet export --checkpoint runs/x/last.pt --output model.onnx                  # dynamic batch and size
    retinanet export --checkpoint runs/x/last.pt --output model.onnx --image-size 800 1344
    det = retinanet.export.load_onnx("model.onnx")             # an OnnxPredictor: Predictor's predict()
    det = retinanet.export.load_onnx("model.onnx", engine="openvino")

The graph holds all of inference after the resize: normalisation, backbone, FPN, head and the paper's
post-processing exactly as `retinanet.postprocess` does it (per level the top k (anchor, class) pairs, the score
threshold, decoding, clipping; class-wise NMS by ONNX NonMaxSuppression; the top N per image), so that an engine
returns the detections our PyTorch model returns. The resize stays on the host (`OnnxPredictor` resizes exactly as
`Predictor` does), because antialiased resizing has no ONNX operator that engines agree on.

    inputs   images       [B, 3, H, W] float32 in [0, 1]: each image resized as evaluation resizes it, at the top
                          left, zero-padded; H and W multiples of the model's size_divisible (32)
             image_sizes  [B, 2] int64: each image's (h, w) inside the padding (boxes are clipped to it)
    outputs  boxes        [B, D, 4] float32 XYXY in the input's pixels
             scores       [B, D] float32
             labels       [B, D] int64 in 0..K-1
             num_detections [B] int64: image b's detections are its first num_detections[b] rows, by decreasing
                          score; the rows after them are zeros with label -1. D = detections_per_image.

The model's config (sizes, thresholds, class names and ids) travels in the file's metadata ("retinanet.config"),
so that a runner needs the .onnx file alone. ONNX Runtime and OpenVINO are optional: without them everything else
works, and what needs them says which package and extra to install.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from retinanet.anchors import AnchorGenerator
from retinanet.config import ModelConfig, apply_overrides, config_to_dict
from retinanet.detector import RetinaNet
from retinanet.head import _flatten
from retinanet.postprocess import Detections
from retinanet.predictor import Predictor, categories_of

__all__ = [
    "ENGINES",
    "Agreement",
    "ExportReport",
    "InferenceGraph",
    "OnnxPredictor",
    "compare_detections",
    "export_onnx",
    "load_onnx",
    "read_metadata",
]

ENGINES = ("onnxruntime", "openvino")
MIN_OPSET = 17
DEFAULT_OPSET = 18
FORMAT_VERSION = "1"
INPUT_NAMES = ["images", "image_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]
_EXTRAS = {"onnx": "retinanet[onnx]", "onnxscript": "retinanet[onnx]", "onnxruntime": "retinanet[onnx]",
           "openvino": "retinanet[openvino]"}  # fmt: skip


def require(package: str) -> Any:
    """The module `package`, or a one-line ValueError naming it and the pip extra that installs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(f"{package} is not installed: pip install {package} (or pip install "
                         f"'{_EXTRAS.get(package, package)}')") from None  # fmt: skip


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
        boxes, class_scores, op.Constant(value_ints=[max_per_class]), op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[0.0]),
    )  # fmt: skip


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
        cls_per_level = [_flatten(head.cls_logits(head.cls_tower(f)), self.num_classes) for f in features]
        box_per_level = [_flatten(head.box_deltas(head.box_tower(f)), 4) for f in features]
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = _anchors_per_level(model.anchor_generator, grid_sizes, images.shape[-2:])
        boxes, scores, labels = self._candidates(cls_per_level, box_per_level, anchors, image_sizes)
        return self._detections(boxes, scores, labels)

    def _normalised(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """(images - mean) / std with the padding zero, as `RetinaNet.preprocess` pads after normalising."""
        model = self.model
        ys = torch.arange(images.shape[2], device=images.device)
        xs = torch.arange(images.shape[3], device=images.device)
        inside = (ys[None, :, None] < image_sizes[:, 0, None, None]) & (xs[None, None, :] < image_sizes[:, 1, None, None])
        return (images - model.pixel_mean) / model.pixel_std * inside[:, None].to(images.dtype)

    def _candidates(
        self, cls_per_level: list[Tensor], box_per_level: list[Tensor], anchors_per_level: list[Tensor],
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
        class_scores = torch.where(labels[:, None, :] == classes[None, :, None], scores[:, None, :],
                                   torch.zeros_like(scores[:, None, :]))  # [B, K, N]  # fmt: skip
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
        levels.append(generator._level_anchors(base, (gh, gw), stride).to(torch.float32))
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
        raise ValueError(f"image size {tuple(image_size)}: height and width must be multiples of {d} (the model's "
                         "size_divisible), at least {d}")  # fmt: skip
    graph = InferenceGraph(_exportable_copy(model)).eval()
    height, width = image_size or (2 * d * 4, 3 * d * 4)  # any example size: the dims are marked dynamic
    images = torch.rand(2, 3, height, width)
    sizes = torch.tensor([[height, width], [height - d, width - d]], dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=1024)
    dims: dict[str, Any] = {"images": {0: batch}, "image_sizes": {0: batch}}
    if image_size is None:
        dims["images"].update({2: d * torch.export.Dim("height_blocks", min=1, max=16384 // d),
                               3: d * torch.export.Dim("width_blocks", min=1, max=16384 // d)})  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), _quiet("onnx_ir"):
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # the batch dim named twice
        program = torch.onnx.export(
            graph, (images, sizes), dynamic_shapes=dims, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            opset_version=opset, dynamo=True, external_data=False, verbose=False,
            custom_translation_table={torch.ops.retinanet.nms_per_class.default: _nms_to_onnx},
        )  # fmt: skip
    program.model.metadata_props.update(_metadata(cfg, categories or categories_of(model), image_size))
    program.save(str(path), external_data=False)
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
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
    saved = {**json.loads(meta["retinanet.config"]), "backbone_weights": None, "init_from": None}
    cfg = ModelConfig.from_dict(saved, where=f"{path}: retinanet.config")
    size = json.loads(meta.get("retinanet.image_size", "null"))
    return cfg, json.loads(meta["retinanet.categories"]), tuple(size) if size else None


# ----------------------------------------------------------------------------------------------------------------
class _OnnxRuntime:
    """An ONNX Runtime CPU session: all graph optimisations, `threads` intra-op threads (default: its own choice,
    one per physical core). spinning: whether idle threads spin waiting for work (ONNX Runtime's default: faster
    on a machine of one's own, wasteful on one shared with other processes)."""

    def __init__(self, path: Path, threads: int | None = None, spinning: bool = True):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray, image_sizes: np.ndarray) -> list[np.ndarray]:
        return self.session.run(OUTPUT_NAMES, {"images": images, "image_sizes": image_sizes})


class _OpenVino:
    """An OpenVINO model compiled for the CPU. hint: "LATENCY" (one request at a time, as here) or "THROUGHPUT";
    precision: "f32", or "bf16" where the CPU computes it natively (OpenVINO's own default there)."""

    def __init__(self, path: Path, threads: int | None = None, hint: str = "LATENCY", precision: str = "f32"):
        ov = require("openvino")
        core = ov.Core()
        config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray, image_sizes: np.ndarray) -> list[np.ndarray]:
        out = self.request.infer({"images": images, "image_sizes": image_sizes})
        return [np.asarray(out[self.compiled.output(name)]) for name in OUTPUT_NAMES]


_ENGINE_CLASSES = {"onnxruntime": _OnnxRuntime, "openvino": _OpenVino}


class OnnxPredictor(Predictor):
    """An exported model run by ONNX Runtime or OpenVINO with Predictor's interface (`predict`, `predict_tensors`,
    tiles): images are resized on the host exactly as Predictor resizes them, padded into one batch and run by the
    engine; boxes come back in each image's pixels.

    path: a file written by `export_onnx`. engine: "onnxruntime" or "openvino". threads: the engine's threads
    (default: its own choice). engine_options: ONNX Runtime's spinning, OpenVINO's hint and precision. batch_size,
    score_thresh, tile, overlap: as Predictor's. min_size / max_size: resize settings other than the exported
    model's (a graph of dynamic size takes any).
    """

    def __init__(
        self,
        path: str | Path,
        engine: str = "onnxruntime",
        batch_size: int = 4,
        score_thresh: float | None = None,
        tile: int | None = None,
        overlap: float = 0.2,
        threads: int | None = None,
        engine_options: dict[str, Any] | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
        config, categories, image_size = read_metadata(path)
        sizes = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
        config = apply_overrides(config, sizes, "resize settings")
        self.path, self.engine, self.image_size = Path(path), engine, image_size
        self.model = None
        self._model_resizes = False  # the engine takes resized images: resize on the host, whatever the weights
        self._run = _ENGINE_CLASSES[engine](self.path, threads, **(engine_options or {}))
        self._setup(config, categories, batch_size, score_thresh, tile, overlap)

    def detect_prepared(self, images: list[Tensor], scales: Sequence[tuple[float, float]]) -> list[Detections]:
        batch, sizes = pad_batch(images, self.config.size_divisible, self.image_size)
        boxes, scores, labels, counts = self._run(batch, sizes)
        out = []
        for b, (sy, sx) in enumerate(scales):
            n = int(counts[b])
            # the same float32 division as detect_resized, so that boxes match to the last bit where the graph does
            scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
            out.append(Detections(torch.from_numpy(boxes[b, :n].copy()) / scale, torch.from_numpy(scores[b, :n].copy()),
                                  torch.from_numpy(labels[b, :n].astype(np.int64))))  # fmt: skip
        return out


def pad_batch(
    images: list[Tensor], size_divisible: int, fixed_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The graph's inputs from resized float [3, h, w] images: images [B, 3, H, W] float32 zero-padded at the
    bottom and right to the largest h and w rounded up to size_divisible (or to fixed_size), and image_sizes
    [B, 2] int64."""
    sizes = np.array([tuple(im.shape[-2:]) for im in images], dtype=np.int64)
    if fixed_size is not None:
        height, width = fixed_size
        too_big = [i for i, (h, w) in enumerate(sizes) if h > height or w > width]
        if too_big:
            i = too_big[0]
            raise ValueError(f"image {i}: resized to {tuple(sizes[i].tolist())}, larger than the exported model's fixed input "
                             f"size {fixed_size}; export with a larger --image-size or without it (dynamic size)")
    else:
        height, width = (int(-(-int(s) // size_divisible) * size_divisible) for s in sizes.max(0))
    batch = np.zeros((len(images), 3, height, width), dtype=np.float32)
    for b, im in enumerate(images):
        batch[b, :, : im.shape[-2], : im.shape[-1]] = im.float().cpu().numpy()
    return batch, sizes


def load_onnx(path: str | Path, engine: str = "onnxruntime", **kwargs: Any) -> OnnxPredictor:
    """An OnnxPredictor of an exported file (keyword arguments: see OnnxPredictor)."""
    return OnnxPredictor(path, engine, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Agreement:
    """How one set of detections compares with a reference, image by image.

    matched: detections found in both (same label, every box coordinate within box_tol px, score within
    score_tol); missing / extra: the reference's detections the other lacks, and the other's the reference lacks;
    borderline: those of missing and extra whose score is within score_tol of a cut-off (the score threshold, or the
    lowest score kept by an image that has its full detections_per_image), where the last bit of arithmetic
    decides which side a detection falls on; max_box_diff, max_score_diff: over the matched.
    """

    matched: int = 0
    missing: int = 0
    extra: int = 0
    borderline: int = 0
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0

    @property
    def identical(self) -> bool:
        return self.missing == 0 and self.extra == 0

    @property
    def ok(self) -> bool:
        """Identical up to detections at a cut-off."""
        return self.missing + self.extra == self.borderline

    def describe(self) -> str:
        text = (f"{self.matched} matched (boxes within {self.max_box_diff:.2g} px, scores within "
                f"{self.max_score_diff:.2g}), {self.missing} missing, {self.extra} extra")  # fmt: skip
        return text + (f" ({self.borderline} of them at a score cut-off)" if self.borderline else "")


def compare_detections(
    reference: Sequence[Detections],
    other: Sequence[Detections],
    box_tol: float = 0.5,
    score_tol: float = 1e-3,
    score_thresh: float | None = None,
    limit: int | None = None,
) -> Agreement:
    """Match `other`'s detections to the reference's, image by image (see Agreement). score_thresh and limit (the
    model's score_thresh and detections_per_image) say where the cut-offs are."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference images but {len(other)} compared")
    total = Agreement()
    for ref, oth in zip(reference, other):
        matched_ref, matched_oth, box_diff, score_diff = _match(ref, oth, box_tol, score_tol)
        cutoffs = [c for c in (score_thresh,) if c is not None]
        for d in (ref, oth):
            if limit is not None and len(d.scores) >= limit:
                cutoffs.append(float(d.scores.min()))
        unmatched = torch.cat([ref.scores[~matched_ref], oth.scores[~matched_oth]]).float()
        borderline = sum(any(abs(float(s) - c) <= score_tol for c in cutoffs) for s in unmatched)
        total.matched += int(matched_ref.sum())
        total.missing += int((~matched_ref).sum())
        total.extra += int((~matched_oth).sum())
        total.borderline += borderline
        total.max_box_diff = max(total.max_box_diff, box_diff)
        total.max_score_diff = max(total.max_score_diff, score_diff)
    return total


def _match(ref: Detections, oth: Detections, box_tol: float, score_tol: float) -> tuple[Tensor, Tensor, float, float]:
    """Greedy one-to-one matching by decreasing reference score, each to the closest box of the same label within
    the tolerances: (matched_ref [N] bool, matched_other [M] bool, largest box difference, largest score
    difference among the matched)."""
    matched_ref = torch.zeros(len(ref.scores), dtype=torch.bool)
    matched_oth = torch.zeros(len(oth.scores), dtype=torch.bool)
    if len(ref.scores) == 0 or len(oth.scores) == 0:
        return matched_ref, matched_oth, 0.0, 0.0
    box_diff = (ref.boxes.double()[:, None] - oth.boxes.double()[None]).abs().amax(-1)  # [N, M]
    score_diff = (ref.scores.double()[:, None] - oth.scores.double()[None]).abs()
    close = (box_diff <= box_tol) & (score_diff <= score_tol) & (ref.labels[:, None] == oth.labels[None])
    worst_box = worst_score = 0.0
    for i in ref.scores.argsort(descending=True).tolist():
        candidates = torch.nonzero(close[i] & ~matched_oth).squeeze(1)
        if len(candidates) == 0:
            continue
        j = int(candidates[box_diff[i, candidates].argmin()])
        matched_ref[i] = matched_oth[j] = True
        worst_box = max(worst_box, float(box_diff[i, j]))
        worst_score = max(worst_score, float(score_diff[i, j]))
    return matched_ref, matched_oth, worst_box, worst_score


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """The parity checks of an export: per check (what was run, its Agreement with PyTorch)."""

    path: Path
    checks: list[tuple[str, Agreement]]

    @property
    def ok(self) -> bool:
        return all(a.ok for _, a in self.checks)

    @property
    def compared(self) -> int:
        return sum(a.matched + a.missing for _, a in self.checks)

    def describe(self) -> str:
        lines = [f"{what}: {a.describe()}" for what, a in self.checks]
        if self.compared == 0:
            lines.append("the model found nothing in the sample images, so no detection was compared: give images "
                         "it finds objects in (--check-images)")  # fmt: skip
        return "\n".join(lines)


def sample_images(config: ModelConfig, count: int = 2) -> list[Tensor]:
    """Images of two sizes for the parity check: synthetic shapes, uint8 [3, H, W], a landscape one
    (min_size x 4/3 min_size) and a portrait one (6/5 min_size x min_size)."""
    from retinanet.data import SyntheticShapes

    s = config.min_size
    sizes = [(s, round(s * 4 / 3)), (round(s * 6 / 5), s)]
    images = []
    for i in range(count):
        pil = SyntheticShapes("val", num_images=1, image_size=sizes[i % 2], seed=i).load_image(0)
        images.append(torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1))
    return images


def verify_export(
    model: RetinaNet, path: str | Path, images: Sequence[Tensor] | None = None, engine: str = "onnxruntime"
) -> ExportReport:
    """Run the exported file by `engine` against `model` in PyTorch on `images` ([3, H, W], default:
    `sample_images`): each image alone (batch 1) and all of them together (batch len(images)); same detections
    means same labels, boxes within 0.5 px and scores within 1e-3 (`compare_detections`)."""
    images = list(images) if images is not None else sample_images(model.config)
    runner = OnnxPredictor(path, engine)
    eager = Predictor(copy.deepcopy(model).cpu(), device="cpu", score_thresh=0.0)
    eager._model_resizes = False  # the engine's input: resized on the host, so compare with the same pixels
    cfg = model.config
    checks = []
    for batch in [[im] for im in images] + [images]:
        prepared = [runner.prepare(im) for im in batch]
        inputs, scales = [p for p, _ in prepared], [s for _, s in prepared]
        reference = _padded_like(eager, inputs, scales, runner.image_size)
        found = runner.detect_prepared(inputs, scales)
        shapes = " and ".join("x".join(str(int(v)) for v in im.shape[-2:]) for im in inputs)
        agreement = compare_detections(reference, found, score_thresh=cfg.score_thresh, limit=cfg.detections_per_image)
        checks.append((f"{engine}, batch {len(batch)} ({shapes})", agreement))
    return ExportReport(Path(path), checks)


def _padded_like(
    eager: Predictor, images: list[Tensor], scales: list[tuple[float, float]], fixed_size: tuple[int, int] | None
) -> list[Detections]:
    """PyTorch's detections of prepared images padded as the exported graph pads them: to the fixed input size by
    a blank image in the same batch (the batch pads to its largest image), its detections then dropped."""
    if fixed_size is None:
        return eager.detect_prepared(images, scales)
    blank = torch.zeros(3, *fixed_size)
    return eager.detect_prepared(images + [blank], list(scales) + [(1.0, 1.0)])[:-1]
