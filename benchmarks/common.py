"""Shared helpers of the benchmarks: medians of repeated timings, peak extra memory, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
# headless Chromium for the report's pages: Debian's build (what .ci/run installs), driven by playwright
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium() -> str | None:
    """The Chromium executable, or None where it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def median_time(
    fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> float:
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` runs."""
    return interleaved_median_times([fn], repeats, warmup, sync)[0]


def interleaved_median_times(
    fns: list[Callable[[], object]], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> list[float]:
    """Median wall time in seconds of each fn over `repeats` rounds, each round running every fn once in turn (the
    order rotating from round to round), so that a machine whose speed drifts during the run (shared or throttled
    CPUs) slows all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = [(r + i) % len(fns) for i in range(len(fns))]
        for fn, out in ((fns[i], times[i]) for i in order):
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def peak_extra_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated by PyTorch's CPU allocator during fn(), above what was allocated before it.

    Read from the profiler's allocation events (each [memory] event is one allocation (+) or free (-)), summed in
    time order; tensors that exist before the call (inputs) are not counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort()
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_extra_cuda_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def machine_line() -> str:
    """The CPU by model and capability (what decides which kernels run: AVX-512 or AVX2, native bf16 or not), the
    GPU if any, Python and torch."""
    from retinanet.runtime.fastpath import cpu_info

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    family = (
        next(
            (
                line.split(":")[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("cpu family")
            ),
            "?",
        )
        if Path("/proc/cpuinfo").exists()
        else "?"
    )
    return (
        f"{cpu_info().describe()}, CPU family {family}, {os.cpu_count()} cores{gpu}; "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def cpu_kind() -> str:
    """The CPU kind a CPU figure holds on, as a section-name suffix: vendor and the capability of the kernels that
    ran ("intel-avx512", "amd-avx512", "amd-avx2" when forced to AVX2), so that each kind keeps its own figures."""
    from retinanet.runtime.fastpath import cpu_info

    info = cpu_info()
    vendor = "intel" if "Intel" in info.name else "amd" if "AMD" in info.name else "cpu"
    capped = info.onednn_cap and info.onednn_cap.upper().startswith("AVX2") and info.capability != "AVX2"
    return f"{vendor}-{info.capability.lower()}" + ("-onednn-avx2" if capped else "")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md, stamped with command, machine and date. A CPU
    figure's section (any name not ending in "cuda") is kept per CPU kind: `name-cpu_kind()`, its heading saying
    which."""
    if not name.endswith("cuda"):
        kind = cpu_kind()
        name = f"{name}-{kind}"
        heading, _, rest = body.partition("\n")
        body = f"{heading} ({kind.replace('-', ' ').upper()})\n{rest}" if heading.startswith("#") else body
    forced = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    command = " ".join([*forced, Path(sys.executable).name, *sys.argv])
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        rev = "?"
    stamp = (
        f"Command: `{command}` (run from the repository root; `make bench` runs every benchmark)  \n"
        f"Machine: {machine_line()}  \nDate: {datetime.date.today().isoformat()}, commit {rev or '?'}\n"
    )
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    section = f"{begin}\n{stamp}\n{body.strip()}\n{end}"
    text = (
        BENCHMARKS_MD.read_text()
        if BENCHMARKS_MD.exists()
        else "# Benchmarks\n\nWritten by the scripts in `benchmarks/`.\n"
    )
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + f"\n\n{section}\n"
    BENCHMARKS_MD.write_text(text)


def untrained_tiny(folder: Path, size: int) -> Path:
    """last.pt of retinanet_tiny at `size` px trained for one iteration on the synthetic shapes (in `folder`, made
    once): a model for benchmarks of reading, tiling and memory, where accuracy is not measured."""
    from retinanet.cli import main as cli

    checkpoint = folder / "last.pt"
    if not checkpoint.exists():
        assert (
            cli(
                [
                    "train",
                    "--set",
                    "model.preset=retinanet_tiny",
                    f"model.min_size={size}",
                    f"model.max_size={size}",
                    "data.synthetic_train_images=8",
                    "data.synthetic_val_images=2",
                    "data.synthetic_image_size=128",
                    "train.max_iters=1",
                    "train.batch_size=2",
                    "train.num_workers=0",
                    f"train.output_dir={folder}",
                    "--overwrite",
                ]
            )
            == 0
        )
    return checkpoint
