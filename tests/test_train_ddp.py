"""Two Gloo processes on the CPU, launched by torchrun as in production: the test runs this file as the script.

Twenty runs in a row, each from an empty fast-path cache (a new folder, nothing in memory) that both processes
share, while a bounded CPU-heavy process runs beside them: the timings the probes see are noisy, so processes that
measured on their own would choose differently and DDP would refuse to start. Rank 1's probes are moreover rigged to
prefer the other option: the replicas stay identical only if every process takes rank 0's choices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN_2
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from retinanet.config import train_config
from retinanet.model.checkpoint import load_checkpoint
from retinanet.model.detector import build_model
from retinanet.runtime import fastpath
from retinanet.runtime.machine import Cache
from retinanet.train.distributed import init_distributed
from retinanet.train.loop import train

RUNS = 20


class Squares(Dataset):
    """8 images 64 x 80 px, one bright square each, different per index."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(i)) * 0.3
        x0, y0 = 4 + 5 * i, 3 + 3 * i
        image[:, y0 : y0 + 24, x0 : x0 + 24] += 0.6
        boxes = torch.tensor([[x0, y0, x0 + 24, y0 + 24]], dtype=torch.float32)
        return image, {"boxes": boxes, "labels": torch.tensor([i % 2])}


def _collate(batch):
    return [image for image, _ in batch], [target for _, target in batch]


def _contrary(rank: int) -> list[str]:
    """On ranks other than 0, probes that prefer what rank 0's default would not choose, and count their calls."""
    calls: list[str] = []
    if rank == 0:
        return calls
    fastpath._probe_layouts = lambda *a: calls.append("layout") or {"choice": "contiguous"}
    fastpath._probe_conv = lambda *a: calls.append("conv") or {"choice": "winograd"}
    return calls


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world, _ = init_distributed()
    assert world == 2
    calls = _contrary(rank)
    for run in range(RUNS):
        folder = out / f"run{run:02d}"
        os.environ["RETINANET_CACHE_DIR"] = str(folder / "cache")  # empty, shared by both processes
        fastpath._CACHE = Cache()  # and nothing in memory: a first use in every run
        torch.manual_seed(100 + rank)  # different initial weights per process: DDP must start all from rank 0's
        model = build_model("retinanet_tiny", num_classes=2, size_divisible=32)
        loader = DataLoader(Squares(), batch_size=1, sampler=DistributedSampler(Squares(), seed=0), collate_fn=_collate)
        cfg = train_config(
            max_iters=3,
            batch_size=2,
            warmup_iters=1,
            steps=(),
            log_every=1,
            checkpoint_every=2,
            device="cpu",
            num_workers=0,
        )
        result = train(model, loader, cfg, folder)
        torch.save({k: p.detach() for k, p in model.named_parameters()}, folder / f"params_rank{rank}.pt")
        choices = {**result["fast_paths"].to_dict(), "layout_now": model.memory_format, "probe_calls": len(calls)}
        (folder / f"fast_paths_rank{rank}.json").write_text(json.dumps(choices))
    torch.distributed.destroy_process_group()


HOG = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_training_from_an_empty_cache_on_a_busy_machine_keeps_replicas_identical(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    hog = subprocess.Popen([sys.executable, "-c", HOG.format(seconds=240)])  # one core busy, for 4 minutes at most
    try:
        command = [*TORCHRUN_2, __file__, str(tmp_path)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        hog.kill()
        hog.wait()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    for run in range(RUNS):
        folder = tmp_path / f"run{run:02d}"
        rank0 = torch.load(folder / "params_rank0.pt")
        rank1 = torch.load(folder / "params_rank1.pt")
        assert rank0.keys() == rank1.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"run {run}: {name}"
        mine, theirs = (json.loads((folder / f"fast_paths_rank{r}.json").read_text()) for r in (0, 1))
        assert theirs["probe_calls"] == 0, f"run {run}: rank 1 measured on its own"
        assert mine["memory_format"] == theirs["memory_format"] == mine["layout_now"] == theirs["layout_now"]
        assert mine["amp"] == theirs["amp"] and mine["records"] == theirs["records"], f"run {run}"
        assert theirs["origin"] == "rank 0's, shared with 2 processes"
        assert "fast paths (rank 0's, shared with 2 processes" in (folder / "train.log").read_text()

    first = tmp_path / "run00"
    checkpoint = load_checkpoint(first / "last.pt")  # only rank 0 writes; rank 1 would have raced it
    assert checkpoint["iteration"] == 3 and len(checkpoint["rng"]) == 2
    assert checkpoint["data_position"] == {"epoch": 0, "batch": 3}  # 4 batches per process per epoch
    assert (
        checkpoint["fast_paths"]["memory_format"]
        == json.loads((first / "fast_paths_rank0.json").read_text())["memory_format"]
    )
    for name, value in torch.load(first / "params_rank0.pt").items():
        assert torch.equal(checkpoint["model"][f"{name}"], value), name
    log = (first / "log.jsonl").read_text().splitlines()
    assert len(log) == 3  # one writer: one line per iteration
    assert not [p for p in first.iterdir() if p.name.endswith(".tmp")]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
