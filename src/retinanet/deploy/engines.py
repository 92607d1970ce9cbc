"""The engines that run an exported model on a CPU, ONNX Runtime and OpenVINO, behind Predictor's interface.

    det = retinanet.deploy.load_onnx("model.onnx")             # an OnnxPredictor: Predictor's predict()
    det = retinanet.deploy.load_onnx("model.onnx", engine="openvino")

Images are resized on the host exactly as Predictor resizes them (antialiased resizing has no ONNX operator that
engines agree on), padded into one batch (`pad_batch`) and run by the engine; boxes come back in each image's
pixels. ONNX Runtime and OpenVINO are optional: what needs them says which package and extra to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from retinanet.config import apply_overrides, size_overrides
from retinanet.deploy.graph import OUTPUT_NAMES, read_metadata, require
from retinanet.inference.predictor import Predictor
from retinanet.ops.postprocess import Detections
from retinanet.ops.resize import padded_size

__all__ = ["ENGINES", "OnnxPredictor", "load_onnx", "pad_batch"]

ENGINES = ("onnxruntime", "openvino")


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
        config = apply_overrides(config, size_overrides(min_size, max_size), "resize settings")
        self.path, self.engine, self.image_size = Path(path), engine, image_size
        self.model = None
        self.model_resizes = False  # the engine takes resized images: resize on the host, whatever the weights
        self._run = _ENGINE_CLASSES[engine](self.path, threads, **(engine_options or {}))
        if score_thresh is not None and score_thresh < config.score_thresh:
            raise ValueError(
                f"{path}: the exported model keeps scores above its score_thresh {config.score_thresh}; "
                f"score_thresh {score_thresh} needs a model exported with it (retinanet export "
                f"--score-thresh {score_thresh})"
            )
        self.configure(config, categories, batch_size, score_thresh, tile, overlap)

    def detect_prepared(self, images: list[Tensor], scales: Sequence[tuple[float, float]]) -> list[Detections]:
        batch, sizes = pad_batch(images, self.config.size_divisible, self.image_size)
        boxes, scores, labels, counts = self._run(batch, sizes)
        out = []
        for b, (sy, sx) in enumerate(scales):
            n = int(counts[b])
            # the same float32 division as detect_resized, so that boxes match to the last bit where the graph does
            scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
            out.append(
                Detections(
                    torch.from_numpy(boxes[b, :n].copy()) / scale,
                    torch.from_numpy(scores[b, :n].copy()),
                    torch.from_numpy(labels[b, :n].astype(np.int64)),
                )
            )
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
            raise ValueError(
                f"image {i}: resized to {tuple(sizes[i].tolist())}, larger than the exported model's fixed input "
                f"size {fixed_size}; export with a larger --image-size or without it (dynamic size)"
            )
    else:
        height, width = padded_size(tuple(sizes.max(0)), size_divisible)
    batch = np.zeros((len(images), 3, height, width), dtype=np.float32)
    for b, im in enumerate(images):
        batch[b, :, : im.shape[-2], : im.shape[-1]] = im.float().cpu().numpy()
    return batch, sizes


def load_onnx(path: str | Path, engine: str = "onnxruntime", **kwargs: Any) -> OnnxPredictor:
    """An OnnxPredictor of an exported file (keyword arguments: see OnnxPredictor)."""
    return OnnxPredictor(path, engine, **kwargs)
