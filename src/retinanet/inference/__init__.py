"""A trained model at work: the predictor (images of any size in, detections in their pixels out), tiled
inference for large images and rasters, batch inference over files, folders, globs and list files, detections drawn;
test-time augmentation for any of them."""

from retinanet.inference.files import InferenceResult, draw_mode, image_files, run_inference
from retinanet.inference.predictor import (
    Prediction,
    Predictor,
    categories_of,
    detect_resized,
    load,
    prepare_image,
    read_image,
)
from retinanet.inference.tiling import detect_tiled, merge_tiles, tile_windows
from retinanet.inference.tta import TTA_CHOICES, check_tta, predict_views
from retinanet.inference.writers import write_csv, write_yolo_txt

__all__ = [
    "TTA_CHOICES",
    "InferenceResult",
    "Prediction",
    "Predictor",
    "categories_of",
    "check_tta",
    "detect_resized",
    "detect_tiled",
    "draw_mode",
    "image_files",
    "load",
    "merge_tiles",
    "predict_views",
    "prepare_image",
    "read_image",
    "run_inference",
    "tile_windows",
    "write_csv",
    "write_yolo_txt",
]
