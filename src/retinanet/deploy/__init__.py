"""Deployment through existing engines: the ONNX graph (decoding and class-wise NMS inside), ONNX Runtime and
OpenVINO behind the predictor's interface, and the parity check against PyTorch."""

from retinanet.deploy.engines import ENGINES, OnnxPredictor, load_onnx, pad_batch
from retinanet.deploy.graph import InferenceGraph, export_onnx, read_metadata
from retinanet.deploy.parity import (
    Agreement,
    ExportReport,
    compare_detections,
    compare_engines,
    sample_images,
    verify_export,
)
from retinanet.deploy.quantize import int8_path, quantize_int8

__all__ = [
    "ENGINES",
    "Agreement",
    "ExportReport",
    "InferenceGraph",
    "OnnxPredictor",
    "compare_detections",
    "compare_engines",
    "export_onnx",
    "int8_path",
    "load_onnx",
    "pad_batch",
    "quantize_int8",
    "read_metadata",
    "sample_images",
    "verify_export",
]
