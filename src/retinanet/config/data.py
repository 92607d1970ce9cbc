"""Where a run's images and boxes come from: DataConfig (their sizes in training and evaluation are the model's)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from retinanet.config.checked import Checked

__all__ = ["AUGMENT_PRESETS", "EXTRA_VAL_KEYS", "FORMATS", "DataConfig"]

FORMATS = ("synthetic", "coco", "voc", "csv", "yolo")
AUGMENT_PRESETS = ("flip", "top_down", "none")  # retinanet.data.augment.PRESETS


@dataclass
class DataConfig(Checked):
    """Where the images and boxes come from (their sizes in training and evaluation are the model's: ModelConfig).

    coco: train_images + train_annotations (val_images + val_annotations); voc: root + train_split (val_split);
    csv: train_annotations (+ classes) and val_annotations; yolo: root = the Ultralytics data.yaml (its train and val
    images; train_images / val_images, a folder or a .txt list, in place of its entries); synthetic: no paths.
    """

    WHERE = "data config"

    format: str = "synthetic"
    root: str | None = None  # VOC root (JPEGImages/, Annotations/, ImageSets/Main/); YOLO: its data.yaml
    train_images: str | None = None
    train_annotations: str | None = None
    train_split: str = "trainval"
    val_images: str | None = None
    val_annotations: str | None = None
    val_split: str = "test"
    # more validation sets, each evaluated and reported on its own beside the first (images of another site, camera
    # or season: what a detector meets after training): a name -> the val_* keys that differ from the first's, e.g.
    # {other_site: {val_annotations: site2.json, val_images: site2/}}. train.best_weights weighs them for best.pt
    extra_val: dict[str, dict[str, str]] | None = None
    classes: str | None = None  # CSV classes file
    # synthetic
    synthetic_train_images: int = 4000
    synthetic_val_images: int = 200
    synthetic_image_size: int = 192
    synthetic_seed: int = 0
    synthetic_cache: bool = False  # keep drawn training images in memory (worth it when epochs repeat)
    # keep the decoded training images in memory (H x W x 3 bytes each, in each data worker): on a small dataset
    # seen for many epochs the workers then decode nothing after the first epoch
    cache_images: bool = False
    # how crowded and how small (the ablations' harder set: many small objects, closer to COCO's imbalance): 1 to
    # synthetic_max_objects objects per image, extents from synthetic_min_object_size px to
    # synthetic_max_object_frac of the image side; the defaults are SyntheticShapes' own
    synthetic_max_objects: int = 6
    synthetic_min_object_size: int = 12
    synthetic_max_object_frac: float = 0.8
    # training augmentation (retinanet.data.augment): a preset ("flip": the paper's horizontal flips; "top_down":
    # flips, 90-degree rotations, colour and scale jitter, crops and mosaics for small objects seen from above;
    # "none"), then any of its operations set on its own (None: the preset's value)
    augment: str = "flip"
    flip_prob: float | None = None  # horizontal flips
    vflip_prob: float | None = None
    rotate90_prob: float | None = None
    brightness: float | None = None  # colour jitter strengths (torchvision's ColorJitter)
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    scale_jitter: tuple[float, float] | None = None  # the training size times a factor drawn from [low, high]
    crop_prob: float | None = None  # a random crop whose sides are a share drawn from crop_scale of the image's
    crop_scale: tuple[float, float] | None = None
    min_visible: float | None = None  # a box cut by a crop or mosaic is kept when this share of it stays inside
    mosaic_prob: float | None = None  # four images in one
    skip_bad: bool = False

    def problems(self) -> list[str]:
        out = [] if self.format in FORMATS else [f"format = {self.format!r} is not one of {list(FORMATS)}"]
        out += _extra_val_problems(self.extra_val)
        if self.augment not in AUGMENT_PRESETS:
            out.append(f"augment = {self.augment!r} is not one of {list(AUGMENT_PRESETS)}")
        for name in ("flip_prob", "vflip_prob", "rotate90_prob", "crop_prob", "mosaic_prob", "min_visible"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                out.append(f"{name} = {value} must be in [0, 1]")
        if self.synthetic_image_size < 32:
            out.append(f"synthetic_image_size = {self.synthetic_image_size} must be at least 32")
        if self.synthetic_max_objects < 1 or self.synthetic_min_object_size < 2:
            out.append(
                f"synthetic_max_objects must be >= 1 and synthetic_min_object_size >= 2, got "
                f"{self.synthetic_max_objects} and {self.synthetic_min_object_size}"
            )
        if not 0 < self.synthetic_max_object_frac <= 1:
            out.append(f"synthetic_max_object_frac = {self.synthetic_max_object_frac} must be in (0, 1]")
        return out


EXTRA_VAL_KEYS = ("val_images", "val_annotations", "val_split")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _extra_val_problems(extra: object) -> list[str]:
    if extra is None:
        return []
    if not isinstance(extra, dict):
        return [f"extra_val = {extra!r} must be a mapping of names to {{val_annotations: ..., val_images: ...}}"]
    out = []
    for name, keys in extra.items():
        if not isinstance(name, str) or not _NAME.match(name) or name == "val":
            out.append(f"extra_val: name {name!r} must be letters, digits, '.', '_' or '-' (not 'val': the first set)")
        elif not isinstance(keys, dict) or not keys or set(keys) - set(EXTRA_VAL_KEYS):
            out.append(f"extra_val.{name} = {keys!r} must be a mapping of some of {list(EXTRA_VAL_KEYS)} to paths")
        elif not all(isinstance(v, str) for v in keys.values()):
            out.append(f"extra_val.{name}: every value must be a path (a string), got {keys!r}")
    return out
