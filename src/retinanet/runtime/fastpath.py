"""Fast paths that depend on the machine, chosen by measurement in this one place.

What runs fastest differs between CPUs. On a 2-core AVX-512 Xeon and a 2-core AVX2 EPYC (both measured) the 3x3
convolutions where Winograd F(4x4, 3x3) beats oneDNN's direct algorithm differ, channels-last helps some
convolutions and hurts others, and bfloat16 is fast only where the CPU computes it natively (avx512_bf16 or AMX):
emulated, a bf16 convolution is tens of times slower than float32. So none of it is assumed. Each choice is
measured at first use and kept, like cuDNN's benchmark mode:

- the 3x3 convolution algorithm, per shape class (channels in and out, batch, map size to a half octave, training
  or inference, layout): `conv3x3_algorithm`, which the model's convolutions ask for their "auto" setting;
- the model's memory layout, channels-last or contiguous, per model and input size class: `tune`;
- bfloat16 autocast, for amp "auto": only with native bf16 and where measured faster (`choose_amp`); asked for
  explicitly on a CPU without native bf16 it is refused (`check_amp`).

A probe keeps the default (torch's convolution, channels-last, float32) unless the other option is faster by
MARGIN in every one of ROUNDS interleaved rounds, so that timing noise on a busy machine cannot flip a choice; its
figures (the median of each option) are kept with the choice, for the logs.

Choices are cached per machine (retinanet.runtime.machine: in memory and in a JSON file that processes share safely), so
that a machine measures a shape class once, with how busy it was. A cached choice measured while other processes
computed is measured again once the machine is quiet, and a layout or precision whose one-round check disagrees
with its figures by more than RECHECK is measured again; NOTES (and a run's log) say so.

A training run makes its choices once, at its first batch (`begin_run`): in a distributed run rank 0 measures and
every process takes rank 0's choices before DDP wraps the model, and a training shape class first met later takes
the default on every process without a probe (no process measures alone while the others compute). The choices are
a `RunFastPaths`, written into the run's checkpoints and train.log; a resumed run on the same machine takes them
from its checkpoint, whatever the cache holds. The config forces any choice (ModelConfig.conv_algorithm and
memory_format, TrainConfig.amp). On a GPU nothing is probed: channels-last and torch's (cuDNN's) convolutions.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from retinanet.runtime.fastpath_run import ROUNDS, RunFastPaths, figures
from retinanet.runtime.machine import Cache, CpuInfo, busy_processes, cpu_info, machine_id

__all__ = [
    "CpuInfo",
    "MARGIN",
    "MEMORY_FORMATS",
    "NOTES",
    "ROUNDS",
    "RunFastPaths",
    "begin_run",
    "check_amp",
    "choose_amp",
    "conv3x3_algorithm",
    "cpu_info",
    "machine_id",
    "summary",
    "tune",
]

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# Below these sizes a 3x3 convolution is computed directly without a probe: Winograd's transforms cost more than
# the multiplications they save (measured on both CPU kinds), and probing tiny convolutions would cost more than
# it could win.
PROBE_MIN_CHANNELS = 32
PROBE_MIN_POSITIONS = 8 * 8
# The other option replaces the default only when it is at least 5% faster in every round. Winograd's float32
# rounding is a little coarser, bf16's much coarser, and a layout change costs a copy: none is worth a tie.
MARGIN = 0.95
DEFAULTS = {"conv3x3": "direct", "memory_format": "channels_last", "amp": "none"}
_CACHE = Cache()
# a cached record whose one-round check is more than this many times away from its figures is measured again
RECHECK = 1.5
NOTES: list[str] = []  # what this process measured again, and why: begin_run puts them in the run's log
_CHECKED: set[tuple[str, str]] = set()  # the cached records this process has checked


# ----------------------------------------------------------------------------------------------------------------
def begin_run(
    model: Any,
    batch: tuple[list[Tensor], list[dict[str, Tensor]]] | None,
    amp: str,
    device: torch.device | str,
    saved: dict[str, Any] | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[RunFastPaths, list[str]]:
    """Make a training run's choices at its first batch and set the model's layout; returns them and log lines.

    model: the RetinaNet to train (not yet wrapped by DDP); batch: this process's first (images, targets), as the
    model's loss takes them with resize=False (None: nothing left to train, the layout is not measured); amp: the
    config's train.amp; saved: the choices of the checkpoint the run resumes from. Choices forced in the config
    win; else a checkpoint's from this machine (`machine_id`) are taken as they are, else they are measured (the
    cache's, or a probe's). In a distributed run (this process's `rank` of `world`) only rank 0 does this, and every
    process takes rank 0's choices: call it on every process, before DDP wraps the model.
    """
    device = torch.device(device)
    check_amp(amp, device)
    lines: list[str] = []
    reuse = saved if saved and saved.get("machine") == machine_id() else None
    if saved and reuse is None:
        lines.append(
            f"fast paths: the checkpoint's were measured on another machine ({saved.get('machine')}); this "
            f"is {machine_id()}: measured again"
        )
    run = None
    if rank == 0:
        run = RunFastPaths(machine_id(), records=copy.deepcopy(reuse["records"]) if reuse else {})
        run.origin = "the checkpoint's" if reuse else "measured"
        model.use_fast_paths(run)  # what tune's probes measure on the way is the run's
        run.amp = amp if amp != "auto" else (reuse["amp"] if reuse else choose_amp(amp, device, run))
        forced = model.config.memory_format
        if forced != "auto":
            run.memory_format = forced
        elif device.type != "cpu" or (batch is None and reuse is None):
            run.memory_format = DEFAULTS["memory_format"]
        else:
            run.memory_format = reuse["memory_format"] if reuse else tune(model, *batch)
    if world > 1:  # rank 0's choices become every process's, before DDP compares the replicas' layouts
        shared = [run.to_dict() if run is not None else None]
        dist.broadcast_object_list(shared, src=0)
        run = RunFastPaths.from_dict(shared[0])
        run.shared = True
        run.origin = f"rank 0's, shared with {world} processes" + (" (from the checkpoint)" if reuse else "")
    model.use_fast_paths(run)
    model.use_memory_format(run.memory_format)
    lines += NOTES
    NOTES.clear()
    return run, lines


# ----------------------------------------------------------------------------------------------------------------
def _choose(
    kind: str,
    key: str,
    measure: Callable[..., dict[str, Any]],
    lockstep: bool,
    recheck: bool = False,
    run: RunFastPaths | None = None,
) -> dict[str, Any]:
    """The record of a choice: the run's (`run`, the fast paths of the model asking, if it holds it), else the
    cache's, else measured.
    lockstep: a training choice every process of a distributed run makes alike; met after a shared run's start,
    it takes the default without a probe. A cached record is measured again (once per process, said in a note)
    where `_stale` finds it untrue: measured while other processes computed, now that the machine is quiet; or,
    with `recheck` (measure(rounds) then also gives a one-round check), where a quick check disagrees with its
    figures. A new record keeps how busy the machine was."""
    record = run.records.get(kind, {}).get(key) if run is not None else None
    if record is None:
        if run is not None and run.shared and lockstep:  # not even the cache: processes may hold different ones
            record = {"choice": DEFAULTS[kind], "measured": False}
        else:
            record = _CACHE.get(kind, key)
            if record is not None and (kind, key) not in _CHECKED:
                _CHECKED.add((kind, key))
                why = _stale(record, measure if recheck else None)
                if why:
                    NOTES.append(
                        f"fast paths: the cached {kind} choice for {key} ({record['choice']}) was measured again: {why}"
                    )
                    record = None
            if record is None:
                record = {**measure(), "busy": busy_processes()}
                _CACHE.put(kind, key, record)
        if run is not None:
            run.records.setdefault(kind, {})[key] = record
    _CACHE.used.setdefault(kind, {})[key] = record
    return record


def _stale(record: dict[str, Any], quick: Callable[..., dict[str, Any]] | None) -> str | None:
    """Why a cached record no longer holds, or None: it was measured while other processes computed and the machine
    is quiet now; or a one-round check (quick(1)) puts the two options' ratio more than RECHECK times away from the
    record's figures."""
    busy = record.get("busy", 0)
    if busy and busy_processes() == 0:
        return f"it was measured while {busy} other process(es) computed, and the machine is quiet now"
    figures = {k[:-3]: v for k, v in record.items() if k.endswith("_ms")}
    if quick is None or len(figures) != 2 or record.get("choice") not in figures:
        return None
    chosen = record["choice"]
    other = next(name for name in figures if name != chosen)
    now = {k[:-3]: v for k, v in quick(1).items() if k.endswith("_ms")}
    was, found = figures[other] / figures[chosen], now[other] / now[chosen]
    if abs(math.log(found / was)) <= math.log(RECHECK):
        return None
    return (
        f"a quick check ({chosen} {now[chosen]:.3g} ms, {other} {now[other]:.3g} ms) is more than {RECHECK:g}x "
        f"away from its figures ({chosen} {figures[chosen]:.3g} ms, {other} {figures[other]:.3g} ms)"
    )


def _compare(default: str, other: str, run: Callable[[str], object], rounds: int = ROUNDS) -> dict[str, Any]:
    """Time run(default) and run(other) in `rounds` interleaved rounds after a warm-up of each (the order flips
    every round, so that a drift of the machine's speed hits both alike): `other` is chosen only if it is faster
    than MARGIN x default in every round. The record holds the choice and each option's median in ms."""
    times: dict[str, list[float]] = {default: [], other: []}
    run(default)
    run(other)
    for r in range(rounds):
        for name in (default, other) if r % 2 == 0 else (other, default):
            t0 = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - t0)
    wins = all(o < MARGIN * d for o, d in zip(times[other], times[default]))
    return {
        "choice": other if wins else default,
        **{f"{name}_ms": round(statistics.median(t) * 1e3, 3) for name, t in times.items()},
    }


# ----------------------------------------------------------------------------------------------------------------
# the 3x3 convolution algorithm


def _conv_class(x: Tensor, weight: Tensor, training: bool) -> str:
    n, c, h, w = x.shape
    positions = 2 ** (round(2 * math.log2(h * w)) / 2)
    layout = "cl" if _is_channels_last(x) else "nchw"
    return f"{c}->{weight.shape[0]} n{n} ~{positions:.0f}px {'train' if training else 'infer'} {layout}"


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def conv3x3_algorithm(
    x: Tensor, weight: Tensor, winograd: Callable[..., Tensor], run: RunFastPaths | None = None
) -> str:
    """ "winograd" or "direct" for a float32 CPU 3x3 convolution with stride 1 and padding 1 of input x [N, C, H, W]
    and weight [K, C, 3, 3]: the faster on this machine, measured once per shape class (forward only, or forward
    and backward when autograd will need the gradients). winograd(x, weight, bias): the Winograd kernel timed
    against F.conv2d. run: the fast paths of the model that asks (its run's choices first; what is measured is
    kept there)."""
    n, c, h, w = x.shape
    if min(c, weight.shape[0]) < PROBE_MIN_CHANNELS or h * w < PROBE_MIN_POSITIONS:
        return "direct"
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    measure = lambda: _probe_conv(tuple(x.shape), weight.shape[0], _is_channels_last(x), training, winograd)  # noqa: E731
    return _choose("conv3x3", _conv_class(x, weight, training), measure, lockstep=training, run=run)["choice"]


def _probe_conv(
    shape: tuple[int, ...], out_channels: int, channels_last: bool, training: bool, winograd: Callable[..., Tensor]
) -> dict[str, Any]:
    """torch's convolution against Winograd's on random data of this shape (`_compare`). Draws from its own
    generator, so that probing does not change the run's random numbers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    weight = torch.randn(out_channels, shape[1], 3, 3, generator=g) * (2.0 / (9 * shape[1])) ** 0.5
    bias = torch.zeros(out_channels)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    algorithms = {"direct": lambda a, b, c: F.conv2d(a, b, c, padding=1), "winograd": winograd}
    if training:
        xs, ws, bs = (t.detach().requires_grad_() for t in (x, weight, bias))

        def run(name: str) -> None:
            y = algorithms[name](xs, ws, bs)
            xs.grad = ws.grad = bs.grad = None
            y.backward(torch.ones_like(y))

        with torch.enable_grad():
            return _compare("direct", "winograd", run)
    with torch.no_grad():
        return _compare("direct", "winograd", lambda name: algorithms[name](x, weight, bias))


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
    training = targets is not None
    measure = lambda rounds=ROUNDS: _probe_layouts(model, images, targets, rounds)  # noqa: E731
    choice = _choose(
        "memory_format",
        _model_class(model, images, training),
        measure,
        lockstep=training,
        recheck=True,
        run=getattr(model, "fast_paths", None),
    )["choice"]
    model.use_memory_format(choice)
    return choice


def _model_class(model: Any, images: list[Tensor], training: bool) -> str:
    cfg = model.config
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    positions = 2 ** (round(2 * math.log2(h * w)) / 2)
    return (
        f"{cfg.backbone}/{cfg.backbone_norm}/freeze{cfg.freeze_at} fpn{cfg.fpn_channels} "
        f"head{cfg.head_convs}x{cfg.head_channels}/{cfg.head_norm} K{cfg.num_classes} n{len(images)} "
        f"~{positions:.0f}px conv {cfg.conv_algorithm} {'train' if training else 'infer'}"
    )


def _probe_layouts(
    model: Any, images: list[Tensor], targets: list[dict[str, Tensor]] | None, rounds: int = ROUNDS
) -> dict[str, Any]:
    """The model's inference or training step (loss and backward) in each layout (`_compare`), on a copy (the
    class's own methods: what an instance may have patched is not timed) that computes its loss on this process
    alone, with the random state put back."""
    probe = copy.deepcopy(model)
    probe.sync_normalizer = False  # one process probes: the others are not in the all-reduce
    cls = type(probe)
    rng = torch.get_rng_state()

    def run(layout: str) -> None:
        probe.use_memory_format(layout)
        if targets is None:
            with torch.no_grad():
                cls.predict(probe, images, resize=False)
        else:
            losses = cls.loss(probe, images, targets, resize=False)
            probe.zero_grad(set_to_none=True)
            sum(losses.values()).backward()

    probe.train(targets is not None)
    try:
        return _compare("channels_last", "contiguous", run, rounds)
    finally:
        torch.set_rng_state(rng)


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


def choose_amp(amp: str, device: torch.device | str, run: RunFastPaths | None = None) -> str:
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
    return _choose("amp", "conv 256->256 n2 64x64 train", _probe_bf16, lockstep=False, recheck=True, run=run)["choice"]


def _probe_bf16(rounds: int = ROUNDS) -> dict[str, Any]:
    """A head convolution's forward and backward in float32 and under bf16 autocast (`_compare`)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 64, 64, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(256, 256, 3, 3, generator=g) * 0.02).requires_grad_()

    def step(precision: str) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = F.conv2d(x, weight, None, 1, 1)
        y.float().sum().backward()

    with torch.enable_grad():
        return _compare("none", "bf16", step, rounds)


# ----------------------------------------------------------------------------------------------------------------
def summary() -> str:
    """What this process runs and why, in one line: the CPU, the layouts and convolution algorithms chosen so far."""
    parts = [cpu_info().describe()]
    for record in _CACHE.used.get("memory_format", {}).values():
        parts.append(f"memory format {record['choice']}" + figures([record]))
    convs = _CACHE.used.get("conv3x3", {}).values()
    if convs:
        wino = sum(r["choice"] == "winograd" for r in convs)
        parts.append(f"3x3 convolutions: Winograd for {wino} of {len(convs)} shape classes, torch's for the rest")
    for record in _CACHE.used.get("amp", {}).values():
        parts.append(f"amp auto: {record['choice']}")
    where = _CACHE.path()
    parts.append(f"measured once per machine, cached in {where}" if where else "measured (cache off)")
    return "; ".join(parts)
