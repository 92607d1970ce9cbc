"""The predictor: a trained model as a function from images to detections in the images' own pixels.

    det = retinanet.load("runs/x/last.pt")
    found = det.predict("photo.jpg")        # a path, a PIL image, an HxWx3 uint8 numpy array or a [3, H, W] tensor
    found.boxes, found.scores, found.labels, found.names
    det.predict(["a.jpg", "b.jpg"])         # a list gives a list

Images are resized exactly as evaluation resizes them: the model's min_size and max_size, by `eval_transforms`
on the decoded pixels, as the evaluation dataset does; then predicted `batch_size` at a time, and the boxes mapped
back to each image's pixels. `retinanet detect` and `retinanet eval` run through the same code (`detect_resized`).

Large images: `load(..., tile=800, overlap=0.2)` detects in overlapping tiles merged across tile borders
(retinanet.inference.tiling). Other engines (ONNX Runtime, OpenVINO: retinanet.deploy.OnnxPredictor) subclass Predictor
and replace `detect_prepared` alone, so that they resize, tile and name classes exactly as it does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision import tv_tensors

from retinanet.config import ModelConfig, size_overrides
from retinanet.data.base import to_rgb
from retinanet.data.transforms import eval_transforms
from retinanet.inference.rasters import Raster
from retinanet.inference.tiling import detect_tiled, detect_windows, tile_windows
from retinanet.inference.tta import check_tta, predict_views
from retinanet.model import RetinaNet, load_model
from retinanet.ops.postprocess import Detections
from retinanet.ops.resize import resize_like_torchvision
from retinanet.runtime import fastpath
from retinanet.runtime.device import resolve_device, resolve_precision

__all__ = ["Prediction", "Predictor", "load", "detect_resized", "prepare_image", "read_image", "categories_of"]

ImageInput = "str | Path | Image.Image | np.ndarray | Tensor"


@dataclass
class Prediction:
    """Detections of one image, in its own pixels, by decreasing score.

    boxes [N, 4] float XYXY; scores [N] float; labels [N] int64 (0..K-1); names [N] class names; category_ids [N]
    the dataset's ids; image_size (H, W); source the file it came from, if any.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    category_ids: list[int]
    image_size: tuple[int, int]
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def to_dicts(self, decimals: int = 2) -> list[dict[str, Any]]:
        """[{"box": [x1, y1, x2, y2], "score", "label", "category_id", "name"}] (JSON-ready)."""
        return [
            {
                "box": [round(float(v), decimals) for v in b],
                "score": round(float(s), 4),
                "label": int(lab),
                "category_id": cid,
                "name": name,
            }
            for b, s, lab, cid, name in zip(
                self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), self.category_ids, self.names
            )
        ]


def categories_of(model: RetinaNet | ModelConfig) -> list[dict[str, Any]]:
    """The categories [{"id", "name"}] by label of a model (or its config): those it was trained on, else "0", ..."""
    cfg = model if isinstance(model, ModelConfig) else model.config
    names = cfg.class_names or tuple(str(i) for i in range(cfg.num_classes))
    ids = cfg.category_ids or tuple(range(cfg.num_classes))
    return [{"id": int(i), "name": n} for i, n in zip(ids, names)]


def read_image(path: str | Path) -> Tensor:
    """uint8 [3, H, W] of an image file in any mode (16-bit and float images scaled by their own range:
    retinanet.data.base.to_rgb); a ValueError naming the file for a missing, corrupt or truncated one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return torch.from_numpy(to_rgb(im).copy()).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot read the image ({exc})") from None


def as_image_tensor(image: Any, index: int = 0) -> tuple[Tensor, str | None]:
    """(a [3, H, W] uint8 or float tensor, its file or None) from any input the predictor takes."""
    if isinstance(image, (str, Path)):
        return read_image(image), str(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(to_rgb(image).copy()).permute(2, 0, 1), None
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {index}: expected an HxWx3 uint8 array, got {image.dtype} {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), None
    if torch.is_tensor(image):
        if image.dim() != 3 or image.shape[0] != 3 or not (image.dtype == torch.uint8 or image.is_floating_point()):
            raise ValueError(
                f"image {index}: expected a [3, H, W] uint8 or float tensor in [0, 1], got "
                f"{image.dtype} {tuple(image.shape)}"
            )
        return image.detach().cpu(), None
    raise ValueError(
        f"image {index}: cannot take a {type(image).__name__}; give a path, a PIL image, an HxWx3 uint8 "
        "array or a [3, H, W] tensor"
    )


def prepare_image(
    image: Tensor, config: ModelConfig, model_resizes: bool = False
) -> tuple[Tensor, tuple[float, float]]:
    """One [3, H, W] image (uint8, or float in [0, 1]) as the network takes it: float [3, h, w] in [0, 1] resized
    as evaluation resizes (the config's min_size and max_size, by `eval_transforms`), and its (h / H, w / W).

    With resize_antialias False (torchvision's weights) the resize is torchvision's, bilinear without antialiasing:
    inside the model when model_resizes (eager PyTorch, whose model does it in torchvision's order for torchvision's
    exact detections; the image is returned unresized, scale (1, 1)), else here (engines that take resized input)."""
    if image.dtype == torch.uint8 and (model_resizes or not config.resize_antialias):
        image = image.float() / 255
    if model_resizes:
        return image, (1.0, 1.0)
    if not config.resize_antialias:
        resized = resize_like_torchvision(image, config.min_size, config.max_size)
    else:
        resize = eval_transforms(config.min_size, config.max_size)
        resized = resize(tv_tensors.Image(image)).as_subclass(Tensor)
    return resized, (resized.shape[-2] / image.shape[-2], resized.shape[-1] / image.shape[-1])


@torch.no_grad()
def detect_resized(
    model: RetinaNet,
    images: list[Tensor],
    scales: Sequence[tuple[float, float]],
    amp: str = "none",
    score_thresh: float | None = None,
    tta: str | None = None,
) -> list[Detections]:
    """Detections of images already resized by the evaluation transform (float [3, h, w] in [0, 1]), with boxes
    divided by each image's (scale_y, scale_x) back into its original pixels, scores above score_thresh (default:
    the model config's); tta: the views of test-time augmentation to fuse (retinanet.inference.tta), None: one
    pass. The one inference path of evaluation, the predictor and `retinanet detect`."""
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        on_device = [im.to(device) for im in images]
        if tta is None:
            out = model.predict(on_device, resize=False, score_thresh=score_thresh)
        else:
            out = predict_views(model, on_device, tta, score_thresh)
    mapped = []
    for d, (sy, sx) in zip(out, scales):
        scale = torch.tensor([sx, sy, sx, sy], device=d.boxes.device)
        mapped.append(Detections((d.boxes.float() / scale).cpu(), d.scores.float().cpu(), d.labels.cpu()))
    return mapped


class Predictor:
    """A model ready to detect objects in images of any size; see the module docstring.

    model: a RetinaNet (put in eval mode and moved to `device`). categories: [{"id", "name"}] by label (default:
    the model's own). batch_size: images per forward pass. amp: "none", or "bf16"/"fp16" autocast (bf16 is refused
    on a CPU without native bf16). score_thresh: the least score returned (default: the model's score_thresh).
    tile / overlap: detect in tiles of tile x tile px sharing `overlap` of a tile, merged across tile borders
    (retinanet.inference.tiling), for images much larger than the model's size; None: the whole image at once.
    tta: test-time augmentation, the views fused ("flips", "turns", "d4": retinanet.inference.tta); None: off.
    """

    def __init__(
        self,
        model: RetinaNet,
        categories: list[dict[str, Any]] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 4,
        amp: str = "none",
        score_thresh: float | None = None,
        tile: int | None = None,
        overlap: float = 0.2,
        tta: str | None = None,
    ):
        device = resolve_device(str(device), "device") if device is not None else next(model.parameters()).device
        self.tta = check_tta(tta)
        self.model = model.to(device).eval()
        self.device = device
        self.amp = resolve_precision(amp, device, "amp")
        self._tuned = False
        self.model_resizes = not model.config.resize_antialias  # torchvision's weights: its own resize
        self.configure(model.config, categories, batch_size, score_thresh, tile, overlap)

    def configure(
        self,
        config: ModelConfig,
        categories: list[dict[str, Any]] | None,
        batch_size: int,
        score_thresh: float | None,
        tile: int | None,
        overlap: float,
    ) -> None:
        """Set what every engine's predictor holds (an engine subclass calls it in place of __init__): the model's
        config, its classes, the batch and tile settings."""
        if tile is not None:
            tile_windows(tile, tile, tile, overlap)  # checks tile and overlap now, not at the first image
        self.config = config
        self.categories = categories or categories_of(config)
        self.batch_size = batch_size
        self.score_thresh = score_thresh if score_thresh is not None else config.score_thresh
        self.tile, self.overlap = tile, overlap
        self.capped_tiles = 0  # tiles whose detections reached the model's cap (config.detections_per_image)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def predict(self, images: Any, score_thresh: float | None = None) -> Prediction | list[Prediction]:
        """Detections of one image (a path, PIL image, HxWx3 uint8 array or [3, H, W] tensor: uint8, or float in
        [0, 1]) or of a list of them (a list of Predictions). score_thresh: for this call, at least the predictor's
        own (it filters what the predictor finds)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        out: list[Prediction] = []
        for start in range(0, len(items), self.batch_size):
            chunk = [as_image_tensor(im, start + i) for i, im in enumerate(items[start : start + self.batch_size])]
            out += self.predict_tensors([t for t, _ in chunk], [src for _, src in chunk], score_thresh)
        return out[0] if single else out

    def predict_tensors(
        self, images: list[Tensor], sources: list[str | None] | None = None, score_thresh: float | None = None
    ) -> list[Prediction]:
        """Predictions of [3, H, W] uint8 (or float in [0, 1]) tensors, resized as evaluation resizes."""
        thresh = self.score_thresh if score_thresh is None else score_thresh
        if thresh < self.score_thresh:
            raise ValueError(
                f"score_thresh {thresh} is below the predictor's own {self.score_thresh}, which it "
                f"detects at: make the predictor with score_thresh={thresh}"
            )
        sources = sources or [None] * len(images)
        if self.tile is not None:
            dets = [
                detect_tiled(image, self._detect_counting_caps, self.tile, self.overlap, self.batch_size, thresh)
                for image in images
            ]
        else:
            dets = self.detect_images(images)
        return [
            self.to_prediction(d, tuple(image.shape[-2:]), src, thresh) for d, image, src in zip(dets, images, sources)
        ]

    @property
    def prepare_fn(self) -> Callable[[Tensor], tuple[Tensor, tuple[float, float]]]:
        """`prepare` as a small picklable function, for DataLoader workers."""
        return functools.partial(prepare_image, config=self.config, model_resizes=self.model_resizes)

    def prepare(self, image: Tensor) -> tuple[Tensor, tuple[float, float]]:
        """The network input of one [3, H, W] image and its scale: `prepare_image` with this model's sizes."""
        return prepare_image(image, self.config, self.model_resizes)

    def predict_raster(self, raster: Raster, score_thresh: float | None = None) -> Prediction:
        """The Prediction of an image read by windows (retinanet.inference.rasters): tile by tile with a tiling
        predictor, memory bounded by the tile batch; else read whole and resized to the model's size."""
        thresh = self.score_thresh if score_thresh is None else score_thresh
        if self.tile is None:
            return self.predict_tensors([raster.read_all()], [str(raster.path)], score_thresh)[0]
        found = detect_windows(
            raster.read,
            (raster.height, raster.width),
            self._detect_counting_caps,
            self.tile,
            self.overlap,
            self.batch_size,
            thresh,
        )
        return self.to_prediction(found, (raster.height, raster.width), str(raster.path), thresh)

    def _detect_counting_caps(self, tiles: list[Tensor]) -> list[Detections]:
        """detect_images, counting the tiles whose detections reach the model's cap in capped_tiles."""
        found = self.detect_images(tiles)
        self.capped_tiles += sum(len(d.scores) >= self.config.detections_per_image for d in found)
        return found

    def detect_images(self, images: list[Tensor]) -> list[Detections]:
        """Detections of [3, H, W] images (uint8, or float in [0, 1]) in their own pixels, in one forward pass."""
        prepared = [self.prepare(image) for image in images]
        return self.detect_prepared([p for p, _ in prepared], [s for _, s in prepared])

    def detect_prepared(self, images: list[Tensor], scales: Sequence[tuple[float, float]]) -> list[Detections]:
        """Detections, in original pixels, of images made ready by `prepare` (float [3, h, w]) with their scales:
        the one step an engine replaces."""
        if self.model_resizes:
            with torch.no_grad():
                return [
                    Detections(d.boxes.cpu(), d.scores.cpu(), d.labels.cpu())
                    for d in self.model.predict([im.to(self.device) for im in images], score_thresh=self.score_thresh)
                ]
        if not self._tuned:  # the memory layout faster on this machine, for batches like this one
            fastpath.tune(self.model, [im.to(self.device) for im in images])
            self._tuned = True
        return detect_resized(self.model, images, scales, self.amp, self.score_thresh, self.tta)

    def to_prediction(
        self, d: Detections, image_size_hw: tuple[int, int], source: str | None = None, thresh: float | None = None
    ) -> Prediction:
        """The Prediction of an image's detections (in its pixels): those scoring at least `thresh` (default: the
        predictor's score_thresh), with class names and the dataset's category ids."""
        keep = d.scores >= (self.score_thresh if thresh is None else thresh)
        labels = d.labels[keep]
        return Prediction(
            d.boxes[keep],
            d.scores[keep],
            labels,
            names=[self.categories[int(k)]["name"] for k in labels],
            category_ids=[int(self.categories[int(k)]["id"]) for k in labels],
            image_size=(int(image_size_hw[0]), int(image_size_hw[1])),
            source=source,
        )


def load(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    min_size: int | None = None,
    max_size: int | None = None,
    **kwargs: Any,
) -> Predictor:
    """A Predictor of a checkpoint written by `retinanet train`; min_size / max_size override the resize it was
    trained with; other keyword arguments go to Predictor (batch_size, amp, score_thresh, tile, overlap, tta)."""
    model = load_model(checkpoint, map_location="cpu", **size_overrides(min_size, max_size))
    return Predictor(model, device=device, **kwargs)
