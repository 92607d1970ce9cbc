"""Where a run's images and boxes come from: DataConfig (their sizes in training and evaluation are the model's)."""

from __future__ import annotations

from dataclasses import dataclass

from retinanet.config.checked import Checked

__all__ = ["FORMATS", "DataConfig"]

FORMATS = ("synthetic", "coco", "voc", "csv")


@dataclass
class DataConfig(Checked):
    """Where the images and boxes come from (their sizes in training and evaluation are the model's: ModelConfig).

    coco: train_images + train_annotations (val_images + val_annotations); voc: root + train_split (val_split);
    csv: train_annotations (+ classes) and val_annotations; synthetic: no paths.
    """

    WHERE = "data config"

    format: str = "synthetic"
    root: str | None = None  # VOC root (JPEGImages/, Annotations/, ImageSets/Main/)
    train_images: str | None = None
    train_annotations: str | None = None
    train_split: str = "trainval"
    val_images: str | None = None
    val_annotations: str | None = None
    val_split: str = "test"
    classes: str | None = None  # CSV classes file
    # synthetic
    synthetic_train_images: int = 4000
    synthetic_val_images: int = 200
    synthetic_image_size: int = 192
    synthetic_seed: int = 0
    synthetic_cache: bool = False  # keep drawn training images in memory (worth it when epochs repeat)
    # how crowded and how small (the ablations' harder set: many small objects, closer to COCO's imbalance): 1 to
    # synthetic_max_objects objects per image, extents from synthetic_min_object_size px to
    # synthetic_max_object_frac of the image side; the defaults are SyntheticShapes' own
    synthetic_max_objects: int = 6
    synthetic_min_object_size: int = 12
    synthetic_max_object_frac: float = 0.8
    flip_prob: float = 0.5  # horizontal flips in training (the paper's only augmentation)
    skip_bad: bool = False

    def problems(self) -> list[str]:
        out = [] if self.format in FORMATS else [f"format = {self.format!r} is not one of {list(FORMATS)}"]
        if not 0 <= self.flip_prob <= 1:
            out.append(f"flip_prob = {self.flip_prob} must be in [0, 1]")
        if self.synthetic_image_size < 32:
            out.append(f"synthetic_image_size = {self.synthetic_image_size} must be at least 32")
        if self.synthetic_max_objects < 1 or self.synthetic_min_object_size < 2:
            out.append(f"synthetic_max_objects must be >= 1 and synthetic_min_object_size >= 2, got "
                       f"{self.synthetic_max_objects} and {self.synthetic_min_object_size}")  # fmt: skip
        if not 0 < self.synthetic_max_object_frac <= 1:
            out.append(f"synthetic_max_object_frac = {self.synthetic_max_object_frac} must be in (0, 1]")
        return out
