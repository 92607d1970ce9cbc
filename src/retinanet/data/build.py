"""Datasets from a run's DataConfig, resized as its ModelConfig says: training transforms (a shorter side drawn from
model.training_sizes, flips) or evaluation transforms (model.min_size). Every image file is checked to exist."""

from __future__ import annotations

from typing import Any

from retinanet.config import DataConfig, ModelConfig, apply_overrides
from retinanet.data.augment import Augmentation, augmentation_of
from retinanet.data.base import DetectionDataset
from retinanet.data.coco import CocoDetection
from retinanet.data.csv import CsvDetection
from retinanet.data.synthetic import SyntheticShapes
from retinanet.data.transforms import eval_transforms, train_transforms
from retinanet.data.voc import VocDetection
from retinanet.data.yolo import YoloDetection, read_data_yaml

__all__ = [
    "FIRST_VAL",
    "build_dataset",
    "categories_config",
    "val_dataset",
    "val_datasets",
    "with_training_augmentation",
]

FIRST_VAL = "val"  # the name of a run's first validation set (data.val_*), beside those of data.extra_val


def build_dataset(
    data: DataConfig, model: ModelConfig, split: str, train_mode: bool, categories: list[dict[str, Any]] | None = None
) -> DetectionDataset:
    """The train or val dataset of `data`, resized as `model` says: training transforms (a shorter side drawn from
    model.training_sizes, and the DataConfig's augmentation) or evaluation transforms (model.min_size). Every image
    file is checked to exist.

    categories: the label map to use where the data does not fix one (CSV without a classes file): the training
    set's for the validation set, the model's for evaluation, so that a name gets the label the model learnt."""
    augmentation = augmentation_of(data) if train_mode else None  # a bad value stops us before any file is read
    dataset = _dataset(data, split, None if train_mode else eval_transforms(model.min_size, model.max_size), categories)
    return with_training_augmentation(dataset, data, model, augmentation) if train_mode else dataset


def with_training_augmentation(
    dataset: DetectionDataset, data: DataConfig, model: ModelConfig, augmentation: Augmentation | None = None
) -> DetectionDataset:
    """`dataset` with training's transforms and mosaic: the model's training sizes and the DataConfig's augmentation
    (retinanet.data.augment)."""
    aug = augmentation or augmentation_of(data)
    dataset.transforms = train_transforms(model.training_sizes, model.max_size, aug)
    dataset.mosaic, dataset.min_visible = aug.mosaic, aug.min_visible
    dataset.cache_images = data.cache_images
    return dataset


def _dataset(data: DataConfig, split: str, tf: Any, categories: list[dict[str, Any]] | None) -> DetectionDataset:
    fmt, is_train = data.format, split == "train"
    if fmt == "synthetic":
        n = data.synthetic_train_images if is_train else data.synthetic_val_images
        size = (data.synthetic_image_size, data.synthetic_image_size)
        return SyntheticShapes(
            split,
            num_images=n,
            image_size=size,
            seed=data.synthetic_seed,
            transforms=tf,
            cache=data.synthetic_cache and is_train,
            max_objects=data.synthetic_max_objects,
            min_size=data.synthetic_min_object_size,
            max_size_frac=data.synthetic_max_object_frac,
        )
    images = data.train_images if is_train else data.val_images
    annotations = data.train_annotations if is_train else data.val_annotations
    if fmt == "coco":
        _require(data, images=images, annotations=annotations, split=split)
        dataset = CocoDetection(images, annotations, transforms=tf, skip_bad=data.skip_bad)
    elif fmt == "csv":
        _require(data, annotations=annotations, split=split)
        dataset = CsvDetection(
            annotations,
            data.classes,
            root=images,
            transforms=tf,
            skip_bad=data.skip_bad,
            categories=None if data.classes else categories,
        )
    elif fmt == "yolo":
        _require(data, root=data.root, split=split)
        dataset = YoloDetection(
            data.root, "train" if is_train else "val", images=images, transforms=tf, skip_bad=data.skip_bad
        )
    else:
        _require(data, root=data.root, split=split)
        voc_split = data.train_split if is_train else data.val_split
        dataset = VocDetection(data.root, voc_split, transforms=tf, skip_bad=data.skip_bad)
    return dataset.check_images()


def _require(data: DataConfig, split: str, **paths: str | None) -> None:
    missing = [k for k, v in paths.items() if v is None]
    if missing:
        raise ValueError(f"data config: format {data.format!r} needs {split} {', '.join(missing)} (set data.* keys)")


def categories_config(model_cfg: ModelConfig, dataset: DetectionDataset) -> ModelConfig:
    """The model config with num_classes and category names/ids taken from the training dataset."""
    return apply_overrides(
        model_cfg,
        {
            "num_classes": dataset.num_classes,
            "class_names": tuple(dataset.category_names),
            "category_ids": tuple(c["id"] for c in dataset.categories),
        },
    )


def val_dataset(data: DataConfig, model: ModelConfig, categories: list[dict[str, Any]]) -> DetectionDataset | None:
    """The first validation set of `data` (val_*), or None where it names none."""
    if data.format == "yolo" and data.root and not data.val_images and not read_data_yaml(data.root).get("val"):
        return None  # a data.yaml without val images
    if data.format == "synthetic" or (data.format in ("voc", "yolo") and data.root) or data.val_annotations:
        return build_dataset(data, model, "val", train_mode=False, categories=categories)
    return None


def val_datasets(data: DataConfig, model: ModelConfig, categories: list[dict[str, Any]]) -> dict[str, DetectionDataset]:
    """Every validation set of `data` by name: the first (val_*) as FIRST_VAL, then data.extra_val's, each read with
    the val_* keys it replaces; {} where there is none. Every file is checked here, before a run starts."""
    found = val_dataset(data, model, categories)
    sets = {FIRST_VAL: found} if found is not None else {}
    for name, keys in (data.extra_val or {}).items():
        extra = apply_overrides(data, dict(keys), f"data config: extra_val.{name}")
        sets[name] = build_dataset(extra, model, "val", train_mode=False, categories=categories)
    return sets
