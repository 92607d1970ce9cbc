"""Checkpoint files: written atomically, read safely (weights_only), and the model rebuilt from the config it
carries. Training writes them (retinanet.train); evaluation, the predictor, export and init_from read them."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from retinanet.config import ModelConfig, TrainConfig, apply_overrides
from retinanet.model.detector import RetinaNet, build_from_config
from retinanet.runtime import fastpath
from retinanet.runtime.outputs import atomic_write

__all__ = [
    "FORMAT_VERSION",
    "load_checkpoint",
    "load_model",
    "model_weights",
    "rng_state",
    "save_checkpoint",
    "saved_model_config",
    "set_rng_state",
]


FORMAT_VERSION = 1  # bump when the checkpoint's keys change meaning; load_checkpoint refuses versions it does not know


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    iteration: int = 0,
    train_config: TrainConfig | Mapping[str, Any] | None = None,
    data_position: Mapping[str, int] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    fast_paths: fastpath.RunFastPaths | None = None,
    ema: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: to a temporary file in the same folder, flushed and fsynced, then renamed
    over `path`, so that a crash during the save leaves the previous checkpoint at `path` intact.

    Keys: format_version, iteration, model (state dict), model_config (dataclasses.asdict(model.config)),
    train_config, optimizer, scheduler, scaler (state dicts or None), rng (one rng_state() per process, by rank),
    data_position ({"epoch", "batch"}), extra, fast_paths (the run's machine-dependent choices,
    fastpath.RunFastPaths as a dict, or None), ema ({"model": the moving average's state dict, "updates"}, or
    None). Every value loads with torch.load(weights_only=True).
    """
    model = getattr(model, "module", model)  # DistributedDataParallel -> the model
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(train_config):
        train_config = dataclasses.asdict(train_config)
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "train_config": dict(train_config) if train_config is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states if rng_states is not None else [rng_state()],
        "data_position": dict(data_position) if data_position is not None else None,
        "extra": dict(extra or {}),
        "fast_paths": fast_paths.to_dict() if fast_paths is not None else None,
        "ema": dict(ema) if ema is not None else None,
    }
    path = Path(path)
    _atomic_save(checkpoint, path)
    return path


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save through retinanet.runtime.outputs.atomic_write: the previous checkpoint stays whole if the write fails
    (a full disk: one line naming the folder and its free space)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (safely: weights_only=True) and check its format_version.

    Raises FileNotFoundError for a missing file and ValueError naming the file for anything that is not such a
    checkpoint (a partial or corrupt file, a bare state dict) or has an unknown format_version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _is_onnx(path):
        raise ValueError(
            f"{path} is an exported ONNX model, not a checkpoint: detect with it by `retinanet detect "
            "--onnx FILE`; --checkpoint takes the last.pt or best.pt of a training run"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        hint = " (it looks like a bare state dict)" if isinstance(checkpoint, dict) else ""
        raise ValueError(f"{path}: not a RetinaNet training checkpoint: no 'format_version' key{hint}")
    version = checkpoint["format_version"]
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format_version {version!r} is not supported; this code reads version {FORMAT_VERSION}"
        )
    return checkpoint


def _is_onnx(path: Path) -> bool:
    """An ONNX file: by its name, or by its first bytes (a protobuf ModelProto starts with ir_version, field 1)."""
    if path.suffix.lower() == ".onnx":
        return True
    with path.open("rb") as f:
        head = f.read(2)
    return head[:1] == b"\x08" and head[1:2] != b"" and head[1] < 32  # torch.save files are zip archives: "PK"


def saved_model_config(checkpoint: Mapping[str, Any], path: str | Path) -> ModelConfig:
    """The model config a checkpoint (read by load_checkpoint) carries, to rebuild its model; a ValueError naming
    the file when it has none."""
    if checkpoint.get("model_config") is None:
        raise ValueError(f"{path}: the checkpoint holds no model_config to build the model from")
    return ModelConfig.from_saved(checkpoint["model_config"], where=f"{path}: model_config")


def model_weights(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The weights to use a checkpoint's model with: the moving average's when the run kept one (what it evaluated),
    else the model's."""
    return checkpoint["ema"]["model"] if checkpoint.get("ema") else checkpoint["model"]


def load_model(path: str | Path, map_location: str | torch.device | None = "cpu", **overrides: Any) -> RetinaNet:
    """The model a checkpoint was saved from, rebuilt from its own model_config (with `overrides` of any of its
    fields, e.g. min_size), with its weights (`model_weights`: the moving average's, if the run kept one)."""
    checkpoint = load_checkpoint(path, map_location)
    config = saved_model_config(checkpoint, path)
    model = build_from_config(apply_overrides(config, overrides, "model overrides"))
    model.load_state_dict(model_weights(checkpoint))
    return model


# ------------------------------------------------------------------------------------------------------------------
# random generators: a checkpoint keeps every process's, so that a resumed run draws what the original would have


def rng_state() -> dict[str, Any]:
    """This process's generator states: python, numpy (as plain lists), torch CPU, and every CUDA device."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
