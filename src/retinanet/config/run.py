"""The configuration of a whole run: model (a preset and its overrides), data and training; YAML in and out.

    model: {preset: retinanet_tiny, num_classes: 5, gamma: 2.0, ...}   # any ModelConfig field
    data:  {format: synthetic | coco | voc | csv, ...}                   # DataConfig
    train: {max_iters: 1000, lr: 0.01, ...}                              # TrainConfig

Command-line overrides use dotted keys: `--set model.gamma=1.0 train.max_iters=200`; values are read as YAML.
An unknown key anywhere is a ValueError that names it and where it came from: the file, or the command line.
Image sizes are the model's (model.min_size, model.max_size, model.train_min_sizes), not the data's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retinanet.config.checked import apply_overrides, config_to_dict
from retinanet.config.data import DataConfig
from retinanet.config.model import ModelConfig, model_config
from retinanet.config.train import TrainConfig
from retinanet.runtime.outputs import atomic_write

__all__ = ["RunConfig", "load_run_config", "save_run_config", "parse_overrides", "run_config_from_dict"]


# keys that moved, with where they live now: an old config gets told, not just "unknown key"
MOVED = {
    ("data", "train_min_sizes"): "model.train_min_sizes",
    ("data", "max_size"): "model.max_size",
    ("data", "eval_min_size"): "model.min_size",
    ("train", "channels_last"): "model.memory_format (auto, channels_last or contiguous)",
}


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


def run_config_from_dict(data: dict[str, Any], where: str = "config", base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from {"model": {...}, "data": {...}, "train": {...}}: the values given applied to `base` (default:
    the defaults), so that missing keys keep base's values. Errors name `where`."""
    return _apply(base or RunConfig(), _sections(data, where), where)


def _sections(data: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with model, data and train sections")
    unknown = sorted(set(data) - {"model", "data", "train"})
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; valid sections are ['data', 'model', 'train']")
    out = {}
    for name in ("model", "data", "train"):
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{where}: section {name!r} must be a mapping of keys to values, got {section!r}")
        for key in section:
            if (name, key) in MOVED:
                raise ValueError(
                    f"{where}: {name}.{key} has moved to {MOVED[name, key]} (image sizes and fast "
                    "paths belong to the model, and travel with its checkpoints)"
                )
        out[name] = dict(section)
    return out


def _apply(base: RunConfig, sections: dict[str, dict[str, Any]], where: str) -> RunConfig:
    """`base` with the sections' values applied; errors name `where` and the section."""
    model = dict(sections.get("model", {}))
    preset = model.pop("preset", None)
    cfg = RunConfig(base.preset, base.model, base.data, base.train)
    if preset is not None:  # a preset replaces the model settings given so far, then this source's keys apply
        cfg.preset = preset
        cfg.model = model_config(preset, where=f"{where}: model")
    if model:
        cfg.model = apply_overrides(cfg.model, model, f"{where}: model")
    if sections.get("data"):
        cfg.data = apply_overrides(cfg.data, sections["data"], f"{where}: data")
    if sections.get("train"):
        cfg.train = apply_overrides(cfg.train, sections["train"], f"{where}: train")
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["model.gamma=1", "train.lr=0.02"] -> {"model": {"gamma": 1}, "train": {"lr": 0.02}} (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"command line: --set {item!r}: expected section.key=value, e.g. train.max_iters=100")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value  # a value YAML cannot read is taken as a string, which the key's type check judges
        out.setdefault(section, {})[name] = parsed
    return out


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from a YAML file (or the defaults) plus dotted command-line overrides. Each source's errors name
    it: the file's keys the file, --set's keys the command line."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        cfg = _apply(cfg, _sections(data, str(path)), str(path))
    if overrides:
        where = "command line (--set)"
        cfg = _apply(cfg, _sections(parse_overrides(overrides), where), where)
    return cfg


def save_run_config(config: RunConfig, path: str | Path) -> Path:
    return atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
