"""The data layer: datasets (COCO, VOC, CSV, YOLO txt, synthetic), transforms, collation and loaders, and the datasets
of a run's DataConfig (build_dataset).

file -> dataset (checked ImageRecords; dataset[i] = (image, target)) -> transforms -> collate_detection ->
the model. Boxes are float [N, 4] XYXY absolute pixels throughout; images are float32 [0, 1], not normalised.
"""

from retinanet.data.augment import PRESETS as AUGMENT_PRESETS
from retinanet.data.augment import Augmentation, augmentation_of
from retinanet.data.base import DatasetError, DetectionDataset, ImageRecord
from retinanet.data.build import (
    FIRST_VAL,
    build_dataset,
    categories_config,
    val_dataset,
    val_datasets,
    with_training_augmentation,
)
from retinanet.data.coco import CocoDetection, parse_coco, to_coco_dict, write_coco
from retinanet.data.collate import collate_detection, make_loader
from retinanet.data.csv import CsvDetection
from retinanet.data.synthetic import SHAPES, SyntheticShapes
from retinanet.data.transforms import ResizeShortLong, eval_transforms, train_transforms
from retinanet.data.voc import VOC_CLASSES, VocDetection
from retinanet.data.yolo import YoloDetection

__all__ = [
    "AUGMENT_PRESETS",
    "Augmentation",
    "augmentation_of",
    "SHAPES",
    "VOC_CLASSES",
    "CocoDetection",
    "CsvDetection",
    "DatasetError",
    "DetectionDataset",
    "ImageRecord",
    "ResizeShortLong",
    "SyntheticShapes",
    "VocDetection",
    "YoloDetection",
    "build_dataset",
    "categories_config",
    "collate_detection",
    "eval_transforms",
    "make_loader",
    "parse_coco",
    "to_coco_dict",
    "train_transforms",
    "val_dataset",
    "val_datasets",
    "FIRST_VAL",
    "with_training_augmentation",
    "write_coco",
]
