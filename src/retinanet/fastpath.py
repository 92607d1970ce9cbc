"""Fast paths that depend on the machine, chosen by measurement in this one place.

What runs fastest differs between CPUs. On a 2-core AVX-512 Xeon and a 2-core AVX2 EPYC (both measured) the 3x3
convolutions where Winograd F(4x4, 3x3) beats oneDNN's direct algorithm differ, channels-last helps some
convolutions and hurts others, and bfloat16 is fast only where the CPU computes it natively (avx512_bf16 or AMX):
emulated, a bf16 convolution is tens of times slower than float32. So none of it is assumed. Each choice is
measured at first use and kept, like cuDNN's benchmark mode:

- the 3x3 convolution algorithm, per shape class (channels in and out, batch, map size to a half octave, training
  or inference, layout): `conv3x3_algorithm`, which `retinanet.winograd.conv2d` asks for its "auto" setting;
- the model's memory layout, channels-last or contiguous, per model and input size class: `tune`, which the
  training loop and the predictor call with their first batch;
- bfloat16 autocast, for amp "auto": only with native bf16 and where measured faster (`choose_amp`); asked for
  explicitly on a CPU without native bf16 it is refused (`check_amp`).

Choices are cached in memory and in a JSON file per machine (RETINANET_CACHE_DIR, default ~/.cache/retinanet;
"off" keeps them in memory only), so that a machine measures a shape class once. The config forces any choice
(ModelConfig.conv_algorithm and memory_format, TrainConfig.amp); `summary` says what was chosen, for logs. On a GPU
nothing is probed: channels-last and torch's (cuDNN's) convolutions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CpuInfo",
    "MEMORY_FORMATS",
    "check_amp",
    "choose_amp",
    "conv3x3_algorithm",
    "cpu_info",
    "summary",
    "tune",
]

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
CACHE_VERSION = 1
# Below these sizes a 3x3 convolution is computed directly without a probe: Winograd's transforms cost more than
# the multiplications they save (measured on both CPU kinds), and probing tiny convolutions would cost more than
# it could win.
PROBE_MIN_CHANNELS = 32
PROBE_MIN_POSITIONS = 8 * 8
# Winograd is chosen only when measured at least this much faster: its float32 rounding is a little coarser
WINOGRAD_MARGIN = 0.97
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it has no bf16 instructions
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuInfo:
    """The CPU as the fast paths see it.

    name: the model name from /proc/cpuinfo. capability: the instruction set of torch's own kernels ("AVX512",
    "AVX2", "DEFAULT"; ATEN_CPU_CAPABILITY caps it). onednn_cap: ONEDNN_MAX_CPU_ISA if set (caps oneDNN's
    convolutions and matrix products). flags: the CPU's feature flags.
    """

    name: str
    capability: str
    onednn_cap: str | None
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """Whether bfloat16 arithmetic runs natively (avx512_bf16 or AMX), not emulated."""
        has = bool({"avx512_bf16", "amx_bf16"} & self.flags)
        return has and (self.onednn_cap or "").upper() not in _NO_BF16_ISAS

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags and (self.onednn_cap or "").upper() not in _NO_BF16_ISAS | {"AVX512_CORE_BF16"}

    def describe(self) -> str:
        bf16 = "native bf16" + (" with AMX" if self.amx else "") if self.native_bf16 else "no native bf16"
        cap = self.capability + (f", oneDNN capped at {self.onednn_cap}" if self.onednn_cap else "")
        return f"{self.name} ({cap}, {bf16}, {torch.get_num_threads()} threads)"


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    name, flags = "unknown CPU", frozenset()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    capability = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None
    return CpuInfo(name, capability, onednn, flags)


def _machine_key() -> str:
    info = cpu_info()
    return f"{info.name} | {info.capability} | oneDNN {info.onednn_cap or 'all'} | torch {torch.__version__} | " \
           f"{torch.get_num_threads()} threads"  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
class _Cache:
    """Measured choices: {kind: {shape class: record}} for this machine, in memory and in a JSON file."""

    def __init__(self) -> None:
        self.memory: dict[str, dict[str, dict[str, Any]]] = {}
        self.loaded_from: Path | None = None
        self.used: dict[str, dict[str, dict[str, Any]]] = {}  # what this process used, for summary()

    @staticmethod
    def path() -> Path | None:
        folder = os.environ.get("RETINANET_CACHE_DIR", "")
        if folder.lower() == "off":
            return None
        base = Path(folder) if folder else Path.home() / ".cache" / "retinanet"
        return base / "fastpaths.json"

    def _read_file(self, path: Path) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
                return data
        return {"version": CACHE_VERSION, "machines": {}}

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self.path()
        if path is not None and self.loaded_from != path:
            mine = self._read_file(path)["machines"].get(_machine_key(), {})
            for k, records in mine.items():
                self.memory.setdefault(k, {}).update(records)
            self.loaded_from = path
        record = self.memory.get(kind, {}).get(key)
        if record is not None:
            self.used.setdefault(kind, {})[key] = record
        return record

    def put(self, kind: str, key: str, record: dict[str, Any]) -> None:
        self.memory.setdefault(kind, {})[key] = record
        self.used.setdefault(kind, {})[key] = record
        path = self.path()
        if path is None:
            return
        with contextlib.suppress(OSError):  # a read-only home must not stop training: the choice stays in memory
            path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read_file(path)  # merge with what other processes wrote meanwhile
            data["machines"].setdefault(_machine_key(), {}).setdefault(kind, {})[key] = record
            fd, tmp = tempfile.mkstemp(prefix=".fastpaths.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)


_CACHE = _Cache()


def _best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of `repeats` runs after a warm-up, in seconds: the minimum, which other processes' load inflates
    least."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------------------------------------------
# the 3x3 convolution algorithm


def _conv_class(x: Tensor, weight: Tensor, training: bool) -> str:
    n, c, h, w = x.shape
    positions = 2 ** (round(2 * math.log2(h * w)) / 2)
    layout = "cl" if _is_channels_last(x) else "nchw"
    return f"{c}->{weight.shape[0]} n{n} ~{positions:.0f}px {'train' if training else 'infer'} {layout}"


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def conv3x3_algorithm(x: Tensor, weight: Tensor) -> str:
    """"winograd" or "direct" for a float32 CPU 3x3 convolution with stride 1 and padding 1 of input x [N, C, H, W]
    and weight [K, C, 3, 3]: the faster on this machine, measured once per shape class (forward only, or forward
    and backward when autograd will need the gradients)."""
    n, c, h, w = x.shape
    if min(c, weight.shape[0]) < PROBE_MIN_CHANNELS or h * w < PROBE_MIN_POSITIONS:
        return "direct"
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    key = _conv_class(x, weight, training)
    record = _CACHE.get("conv3x3", key)
    if record is None:
        times = _probe_conv(tuple(x.shape), weight.shape[0], _is_channels_last(x), training)
        choice = "winograd" if times["winograd"] < WINOGRAD_MARGIN * times["direct"] else "direct"
        record = {"choice": choice, **{f"{k}_ms": round(v * 1e3, 3) for k, v in times.items()}}
        _CACHE.put("conv3x3", key, record)
    return record["choice"]


def _probe_conv(shape: tuple[int, ...], out_channels: int, channels_last: bool, training: bool) -> dict[str, float]:
    """Best time of torch's convolution and of Winograd's on random data of this shape. Draws from its own
    generator, so that probing does not change the run's random numbers."""
    from retinanet.winograd import winograd_conv3x3

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    weight = torch.randn(out_channels, shape[1], 3, 3, generator=g) * (2.0 / (9 * shape[1])) ** 0.5
    bias = torch.zeros(out_channels)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    algorithms = {"direct": lambda a, b, c: F.conv2d(a, b, c, padding=1), "winograd": winograd_conv3x3}
    times = {}
    for name, conv in algorithms.items():
        if training:
            xs, ws, bs = (t.detach().requires_grad_() for t in (x, weight, bias))

            def run(conv=conv, xs=xs, ws=ws, bs=bs):
                y = conv(xs, ws, bs)
                xs.grad = ws.grad = bs.grad = None
                y.backward(torch.ones_like(y))

            with torch.enable_grad():
                times[name] = _best_time(run)
        else:
            with torch.no_grad():
                times[name] = _best_time(lambda conv=conv: conv(x, weight, bias))
    return times


# ----------------------------------------------------------------------------------------------------------------
# the model's memory layout


def tune(model: Any, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> str:
    """Set the memory layout of `model` (a RetinaNet whose config says memory_format "auto") to the faster on this
    machine for batches like this one, and return it.

    images: the batch as the model takes it with resize=False; targets: given for training, where a step's
    forward and backward are timed (on a copy of the model, so that its weights and statistics stay as they are),
    else inference. Measured once per model architecture and batch size class; the 3x3 convolution algorithms are
    probed on the way. A model whose config forces a layout, or one on a GPU, keeps its layout.
    """
    requested = model.config.memory_format
    device = next(model.parameters()).device
    if requested != "auto":
        model.use_memory_format(requested)
        return requested
    if device.type != "cpu":
        model.use_memory_format("channels_last")
        return "channels_last"
    key = _model_class(model, images, training=targets is not None)
    record = _CACHE.get("memory_format", key)
    if record is None:
        times = _probe_layouts(model, images, targets)
        best = min(times, key=times.get)
        record = {"choice": best, **{f"{k}_ms": round(v * 1e3, 1) for k, v in times.items()}}
        _CACHE.put("memory_format", key, record)
    model.use_memory_format(record["choice"])
    return record["choice"]


def _model_class(model: Any, images: list[Tensor], training: bool) -> str:
    cfg = model.config
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    positions = 2 ** (round(2 * math.log2(h * w)) / 2)
    return (f"{cfg.backbone}/{cfg.backbone_norm}/freeze{cfg.freeze_at} fpn{cfg.fpn_channels} "
            f"head{cfg.head_convs}x{cfg.head_channels}/{cfg.head_norm} K{cfg.num_classes} n{len(images)} "
            f"~{positions:.0f}px conv {cfg.conv_algorithm} {'train' if training else 'infer'}")  # fmt: skip


def _probe_layouts(model: Any, images: list[Tensor], targets: list[dict[str, Tensor]] | None) -> dict[str, float]:
    """Best time of the model's inference or training step (loss and backward) in each layout, on a copy (the
    class's own methods: what an instance may have patched is not timed) with the random state put back."""
    probe = copy.deepcopy(model)
    cls = type(probe)
    rng = torch.get_rng_state()
    times = {}
    for layout in ("channels_last", "contiguous"):
        probe.use_memory_format(layout)
        if targets is None:
            probe.eval()
            with torch.no_grad():
                times[layout] = _best_time(lambda: cls.predict(probe, images, resize=False), repeats=1)
        else:
            probe.train()

            def step():
                losses = cls.loss(probe, images, targets, resize=False)
                probe.zero_grad(set_to_none=True)
                sum(losses.values()).backward()

            times[layout] = _best_time(step, repeats=1)
    torch.set_rng_state(rng)
    return times


# ----------------------------------------------------------------------------------------------------------------
# precision


def check_amp(amp: str, device: torch.device | str) -> None:
    """Refuse bfloat16 on a CPU that has no native bf16: it is emulated there, tens of times slower than float32
    (a ResNet-50-FPN training step did not finish in 15 minutes on an AVX2 EPYC)."""
    device = torch.device(device)
    if amp == "bf16" and device.type == "cpu" and not cpu_info().native_bf16:
        raise ValueError(
            f"amp 'bf16' on this CPU ({cpu_info().name}, {cpu_info().capability}): it has no native bfloat16 "
            "(avx512_bf16 or AMX), so bf16 runs emulated, tens of times slower than float32. Use amp 'none' "
            "(float32), or 'auto' to take bf16 only where it is measured faster"
        )


def choose_amp(amp: str, device: torch.device | str) -> str:
    """The precision to run: `amp` itself unless it is "auto", which is bf16 on a GPU that supports it (else
    fp16), and on a CPU bf16 only with native bf16 and where a bf16 convolution is measured faster than float32."""
    check_amp(amp, device)
    if amp != "auto":
        return amp
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type != "cpu" or not cpu_info().native_bf16:
        return "none"
    record = _CACHE.get("amp", "conv 256->256 n2 64x64 train")
    if record is None:
        times = _probe_bf16()
        record = {"choice": "bf16" if times["bf16"] < times["float32"] else "none",
                  **{f"{k}_ms": round(v * 1e3, 2) for k, v in times.items()}}  # fmt: skip
        _CACHE.put("amp", "conv 256->256 n2 64x64 train", record)
    return record["choice"]


def _probe_bf16() -> dict[str, float]:
    """A head convolution's forward and backward in float32 (the faster algorithm) and under bf16 autocast."""
    from retinanet.winograd import conv2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 64, 64, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(256, 256, 3, 3, generator=g) * 0.02).requires_grad_()

    def step(dtype: torch.dtype | None) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            y = conv2d(x, weight, None, 1, 1)
        y.float().sum().backward()

    with torch.enable_grad():
        return {"float32": _best_time(lambda: step(None), 2), "bf16": _best_time(lambda: step(torch.bfloat16), 2)}


# ----------------------------------------------------------------------------------------------------------------
def summary() -> str:
    """What this process runs and why, in one line: the CPU, the layouts and convolution algorithms chosen so far."""
    parts = [cpu_info().describe()]
    for record in _CACHE.used.get("memory_format", {}).values():
        timing = ", ".join(f"{k[:-3]} {v:.0f} ms" for k, v in record.items() if k.endswith("_ms"))
        parts.append(f"memory format {record['choice']} ({timing})")
    convs = _CACHE.used.get("conv3x3", {}).values()
    if convs:
        wino = sum(r["choice"] == "winograd" for r in convs)
        parts.append(f"3x3 convolutions: Winograd for {wino} of {len(convs)} shape classes, torch's for the rest")
    for record in _CACHE.used.get("amp", {}).values():
        parts.append(f"amp auto: {record['choice']}")
    where = _CACHE.path()
    parts.append(f"measured once per machine, cached in {where}" if where else "measured (cache off)")
    return "; ".join(parts)
