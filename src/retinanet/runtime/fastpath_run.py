"""A training run's fast paths as facts of the run (`RunFastPaths`): made once at its first batch
(retinanet.runtime.fastpath.begin_run), held by its model (`RetinaNet.use_fast_paths`) and written into its
checkpoints and train.log."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from retinanet.runtime.machine import cpu_info

__all__ = ["ROUNDS", "RunFastPaths", "figures"]

ROUNDS = 3  # a probe's interleaved rounds: the other option must win every one of them by the margin


@dataclass
class RunFastPaths:
    """The fast paths of one training run, made once at its first batch and then facts of the run.

    machine: `machine_id()` of where they were measured. amp: the precision trained in ("none", "bf16", "fp16").
    memory_format: the model's layout in training. records: every choice the run consulted, {kind: {shape class:
    record}} with kind "conv3x3", "memory_format" or "amp" and record {"choice", the probe's figures}. origin: how
    the choices were made ("measured", "the checkpoint's", "rank 0's, shared with N processes"). shared: a
    distributed run, where a training shape class met after the start takes the default on every process.
    """

    machine: str
    amp: str = "none"
    memory_format: str = "channels_last"
    records: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    origin: str = "measured"
    shared: bool = False

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    def __deepcopy__(self, memo: dict[int, Any]) -> "RunFastPaths":
        """The same object: a copy of the model (its moving average, the layout probe's copy) stays in the run, and
        what it measures is the run's."""
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunFastPaths":
        known = {k: copy.deepcopy(v) for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def describe(self) -> str:
        """One line for train.log: the choices, how they were made, and the figures behind them."""
        parts = [
            f"fast paths ({self.origin}, {cpu_info().describe()}): amp {self.amp}"
            + figures(self.records.get("amp", {}).values())
        ]
        layouts = self.records.get("memory_format", {})
        parts.append(f"memory format {self.memory_format}" + figures(layouts.values()))
        convs = self.records.get("conv3x3", {}).values()
        if convs:
            wino = sum(r["choice"] == "winograd" for r in convs)
            unmeasured = sum("measured" in r and not r["measured"] for r in convs)
            later = f" ({unmeasured} met after the start: torch's, not measured)" if unmeasured else ""
            parts.append(f"3x3 convolutions: Winograd for {wino} of {len(convs)} shape classes{later}")
        return "; ".join(parts)


def figures(records: Any) -> str:
    """The probes' figures of `records`, in words (" (channels_last 2 ms, contiguous 1 ms, medians of 3 rounds)")."""
    figures = [", ".join(f"{k[:-3]} {v:.3g} ms" for k, v in r.items() if k.endswith("_ms")) for r in records]
    figures = [f for f in figures if f]
    return f" ({'; '.join(figures)}, medians of {ROUNDS} rounds)" if figures else ""
