"""The device and the precision a command runs in: one rule for every command (train, eval, detect, export,
analyse) and for the Python API. Errors name the option as the user set it: a command's `--device` / `--amp`, or a
run config's `train.device` / `train.amp`."""

from __future__ import annotations

import torch

from retinanet.runtime import fastpath

__all__ = ["check_precision", "resolve_device", "resolve_precision"]


def _set(flag: str, value: str) -> str:
    """How the user sets `flag` to `value`: "--device cpu" for an option, "train.device=cpu" for a config key."""
    return f"{flag} {value}" if flag.startswith("-") else f"{flag}={value}"


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The device `name` names on this machine: "auto" (a CUDA GPU where torch has one, else the CPU), "cpu",
    "cuda" (this process's GPU: the one torchrun's rank pinned) or "cuda:N". A ValueError in one line for a device
    this machine lacks, naming `flag` (the option or config key that set it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{flag}: device {name!r} but this machine has no CUDA GPU that torch can use; use "
            f"{_set(flag, 'cpu')} (or auto)"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_precision(amp: str, device: torch.device, flag: str = "--amp") -> None:
    """Refuse a precision `device` cannot run, in one line naming `flag`: fp16 off a GPU; bf16 on a CPU without
    native bfloat16 (emulated there, tens of times slower). Measures nothing."""
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"{flag}: amp 'fp16' needs a CUDA device, got {device}; use {_set(flag, 'none')} on a CPU")
    try:
        fastpath.check_amp(amp, device)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def resolve_precision(amp: str, device: torch.device, flag: str = "--amp") -> str:
    """The precision to run in ("none", "bf16", "fp16"): `amp` itself once checked, or for "auto" the measured
    choice (retinanet.runtime.fastpath.choose_amp)."""
    check_precision(amp, device, flag)
    return fastpath.choose_amp(amp, device)
