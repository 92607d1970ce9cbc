"""The configuration of a whole run: model (a preset and its overrides), data and training; YAML in and out.

    model: {preset: retinanet_tiny, num_classes: 5, gamma: 2.0, ...}   # any ModelConfig field
    data:  {format: synthetic | coco | voc | csv, ...}                   # DataConfig
    train: {max_iters: 1000, lr: 0.01, ...}                              # TrainConfig

Command-line overrides use dotted keys: `--set model.gamma=1.0 train.max_iters=200`; values are read as YAML.
An unknown key anywhere is a ValueError that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retinanet.config import ModelConfig, apply_overrides, config_to_dict, model_config
from retinanet.train_config import TrainConfig

__all__ = ["DataConfig", "RunConfig", "load_run_config", "save_run_config", "parse_overrides"]

FORMATS = ("synthetic", "coco", "voc", "csv")


@dataclass
class DataConfig:
    """Where the images and boxes come from, and how they are resized.

    coco: train_images + train_annotations (val_images + val_annotations); voc: root + train_split (val_split);
    csv: train_annotations (+ classes) and val_annotations; synthetic: no paths.
    """

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
    # transforms: training sizes of the shorter side (one is picked per image: several = multi-scale jitter; the
    # paper trains at 800 with horizontal flips), cap on the longer side, evaluation size
    train_min_sizes: tuple[int, ...] = (800,)
    max_size: int = 1333
    eval_min_size: int = 800
    flip_prob: float = 0.5
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data config: format {self.format!r} is not one of {FORMATS}")


@dataclass
class RunConfig:
    preset: str = "retinanet_r50_fpn"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"preset": self.preset, **self.model.to_dict()},
            "data": config_to_dict(self.data),
            "train": self.train.to_dict(),
        }


def run_config_from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    """A RunConfig from {"model": {...}, "data": {...}, "train": {...}}; missing sections take defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with model, data and train sections")
    unknown = sorted(set(data) - {"model", "data", "train"})
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; valid sections are ['data', 'model', 'train']")
    model = dict(data.get("model") or {})
    preset = model.pop("preset", "retinanet_r50_fpn")
    return RunConfig(
        preset=preset,
        model=model_config(preset, **model) if model else model_config(preset),
        data=apply_overrides(DataConfig(), data.get("data") or {}, f"{where}: data"),
        train=apply_overrides(TrainConfig(), data.get("train") or {}, f"{where}: train"),
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["model.gamma=1", "train.lr=0.02"] -> {"model": {"gamma": 1}, "train": {"lr": 0.02}} (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r}: expected section.key=value, e.g. train.max_iters=100")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from a YAML file (or the defaults) plus dotted command-line overrides."""
    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return run_config_from_dict(merge(data, parse_overrides(overrides or [])), where)


def save_run_config(config: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path
