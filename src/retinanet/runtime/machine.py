"""What this machine is, and what it has measured: the CPU as the fast paths see it (`cpu_info`, `machine_id`), and
the cache of measured choices (`Cache`), in memory and in a JSON file per machine.

The file (RETINANET_CACHE_DIR, default ~/.cache/retinanet; "off" keeps choices in memory only) is shared by every
process of the machine: parallel ablation workers, DDP ranks, two runs. Each writes it under a file lock, as one
read-merge-replace step, so that none loses another's entries; readers see the old file or the new one, never half
of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch

from retinanet.runtime.outputs import WriteError, atomic_write

try:  # POSIX file locks; without them (Windows) concurrent writers may lose entries, never corrupt the file
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "CACHE_VERSION",
    "Cache",
    "CpuInfo",
    "busy_processes",
    "cache_key",
    "cpu_info",
    "fixed_mmap_threshold",
    "machine_id",
    "set_threads",
    "thread_budget",
    "usable_cores",
]

CACHE_VERSION = 2  # 2: choices by repeated rounds against a margin (version 1's single timings are measured again)
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it has no bf16 instructions
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


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


def machine_id() -> str:
    """What the choices depend on, thread count aside: the CPU, the kernels' instruction sets and torch's version.
    A run resumed where this is the same takes its checkpoint's choices."""
    info = cpu_info()
    return f"{info.name} | {info.capability} | oneDNN {info.onednn_cap or 'all'} | torch {torch.__version__}"


def cache_key() -> str:
    """The cache's key for this machine: machine_id and the thread count the timings were measured with."""
    return f"{machine_id()} | {torch.get_num_threads()} threads"


class Cache:
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

    @staticmethod
    def _read_file(path: Path) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
                return data
        return {"version": CACHE_VERSION, "machines": {}}

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self.path()
        if path is not None and self.loaded_from != path:
            mine = self._read_file(path)["machines"].get(cache_key(), {})
            for k, records in mine.items():
                self.memory.setdefault(k, {}).update(records)
            self.loaded_from = path
        return self.memory.get(kind, {}).get(key)

    def mine(self) -> dict[str, dict[str, dict[str, Any]]]:
        """This machine's records in the file, {kind: {shape class: record}} ({} without a file)."""
        path = self.path()
        return self._read_file(path)["machines"].get(cache_key(), {}) if path is not None else {}

    def reset(self) -> int:
        """Forget this machine's records (in memory and in the file; other machines' stay); how many there were."""
        self.memory.clear()
        path = self.path()
        if path is None or not path.exists():
            return 0
        with _locked(path):
            data = self._read_file(path)
            count = sum(len(v) for v in data["machines"].pop(cache_key(), {}).values())
            _write_json(path, data)
        return count

    def put(self, kind: str, key: str, record: dict[str, Any]) -> None:
        self.memory.setdefault(kind, {})[key] = record
        path = self.path()
        if path is None:
            return
        with contextlib.suppress(OSError, WriteError):  # a read-only home must not stop training: kept in memory
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):  # read, merge and replace as one step: no writer loses another's entries
                data = self._read_file(path)
                data["machines"].setdefault(cache_key(), {}).setdefault(kind, {})[key] = record
                _write_json(path, data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True))  # readers see the old file or the new one


def busy_processes(samples: int = 3, interval: float = 0.02) -> int:
    """How many other processes are computing on this machine now: those running (state R) that are neither this
    process nor its children (its data workers), the least over `samples` looks `interval` s apart (a brief task is
    not a load). 0 where /proc cannot tell (not Linux)."""
    if not Path("/proc/self/stat").exists():
        return 0
    counts = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        running, parents = set(), {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                pid = int(stat.parent.name)
                parents[pid] = int(fields[1])
                if fields[0] == "R":
                    running.add(pid)
        own = {os.getpid()}
        grew = True
        while grew:  # this process's descendants
            more = {pid for pid, parent in parents.items() if parent in own} - own
            own |= more
            grew = bool(more)
        counts.append(len(running - own))
    return min(counts)


def fixed_mmap_threshold() -> None:
    """Keep large freed blocks returned to the system while a raster is read by windows. glibc's malloc raises its
    mmap threshold as large blocks are freed, and then serves them from the heap, which fragments and grows: by 35 MB
    a second with GDAL's block reads between a model's batches over a 400-megapixel raster (a 6 GB peak). A fixed
    threshold (128 kB, M_MMAP_THRESHOLD) keeps large blocks in mmap, returned when freed. Not glibc: nothing to do."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset), else the machine's."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_budget() -> tuple[int, str]:
    """The intra-op threads this process takes, and why: OMP_NUM_THREADS where it is set (by the user, or by torchrun
    for its ranks: respected as it is); else the usable cores shared among the processes torchrun started on this
    machine (LOCAL_WORLD_SIZE), so that together they do not oversubscribe the cores. Data workers take one thread
    each (torch's DataLoader sets it)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"OMP_NUM_THREADS={omp}"
    cores = usable_cores()
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    if processes == 1:
        return cores, f"the {cores} usable cores"
    return max(1, cores // processes), f"{cores} usable cores shared by {processes} processes"


def set_threads() -> str:
    """Set this process's intra-op threads to its `thread_budget`; the budget in words ("2 threads (...)"). Call at
    the start of a command, before anything is measured (the fast paths' cache is keyed by the thread count)."""
    threads, why = thread_budget()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return f"{threads} thread{'s' if threads > 1 else ''} ({why})"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on path's companion .lock file, held by one process at a time."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
