"""INT8 inference for deployment: an exported model's convolutions quantized by ONNX Runtime's static quantization.

    retinanet export --checkpoint runs/x/last.pt --output model.onnx --int8 --calibration run.yaml
    # writes model.onnx (float32) and model.int8.onnx; `retinanet detect --onnx model.int8.onnx ...` runs it

Static quantization in the QDQ format (QuantizeLinear / DequantizeLinear pairs that engines fuse into integer
kernels): weights per output channel, signed INT8; activations unsigned INT8 with ranges calibrated on images of the
run's own data (its validation images, else its training images: a few hundred at most, resized as the model
resizes them). Only the convolutions (backbone, FPN, head) are quantized: normalisation, decoding, the score
threshold and NMS stay float32, so that boxes are computed as the float32 graph computes them. On a CPU with VNNI
(AVX-512 VNNI, AVX-VNNI) the integer convolutions run at up to four times float32's multiply rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from torch import Tensor

from retinanet.config import ModelConfig
from retinanet.deploy.engines import pad_batch
from retinanet.deploy.graph import INPUT_NAMES, read_metadata, require
from retinanet.inference.predictor import prepare_image
from retinanet.runtime.outputs import atomic_path, writing

__all__ = ["int8_path", "quantize_int8"]


def int8_path(path: str | Path) -> Path:
    """model.onnx -> model.int8.onnx."""
    path = Path(path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def quantize_int8(
    float_model: str | Path, output: str | Path, config: ModelConfig, images: Sequence[Tensor], batch_size: int = 4
) -> Path:
    """Write the INT8 version of an exported float32 model: its convolutions quantized with activation ranges
    calibrated on `images` ([3, H, W] uint8 or float in [0, 1], prepared as the predictor prepares them).
    Returns the path written."""
    require("onnx")
    quantization = require("onnxruntime.quantization")
    if not images:
        raise ValueError("int8: no calibration images (give a config whose data has validation or training images)")
    output = Path(output)
    prepared = Path(output).with_suffix(".prepared.onnx")
    try:  # shape inference and graph clean-up first, as ONNX Runtime recommends for static quantization
        quantization.shape_inference.quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        source = prepared
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation: quantize the export as it is
        source = Path(float_model)
    calibration = _Calibration(config, images, batch_size, read_metadata(float_model)[2])
    with atomic_path(output) as written, writing(output):  # a failed write leaves an earlier INT8 model whole
        quantization.quantize_static(
            str(source),
            str(written),
            calibration,
            quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    if prepared.exists():
        prepared.unlink()
    return output


class _Calibration:
    """ONNX Runtime's CalibrationDataReader: the graph's inputs for batches of calibration images."""

    def __init__(
        self, config: ModelConfig, images: Sequence[Tensor], batch_size: int, fixed_size: tuple[int, int] | None = None
    ):
        self.config, self.images, self.batch_size, self.fixed_size = config, list(images), batch_size, fixed_size
        self._batches: Iterator[dict[str, Any]] = self._iterate()

    def _iterate(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self.images), self.batch_size):
            resized = [prepare_image(im, self.config)[0] for im in self.images[start : start + self.batch_size]]
            batch, sizes = pad_batch(resized, self.config.size_divisible, self.fixed_size)  # the export's input size
            yield dict(zip(INPUT_NAMES, (batch, sizes)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._iterate()
