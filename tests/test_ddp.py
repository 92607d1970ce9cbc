"""Two Gloo processes on the CPU, launched by torchrun as in production: the test runs this file as the script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from retinanet.detector import build_model
from retinanet.engine import init_distributed, load_checkpoint, train
from retinanet.train_config import train_config


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


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world, _ = init_distributed()
    assert world == 2
    torch.manual_seed(100 + rank)  # different initial weights per process: DDP must start all from rank 0's
    model = build_model("retinanet_tiny", num_classes=2, size_divisible=32)
    loader = DataLoader(Squares(), batch_size=1, sampler=DistributedSampler(Squares(), seed=0), collate_fn=_collate)
    cfg = train_config(max_iters=3, batch_size=2, warmup_iters=1, steps=(), log_every=1, checkpoint_every=2,
                       device="cpu", num_workers=0)
    train(model, loader, cfg, out)
    torch.save({k: p.detach() for k, p in model.named_parameters()}, out / f"params_rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_training_keeps_replicas_identical(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    rank0 = torch.load(tmp_path / "params_rank0.pt")
    rank1 = torch.load(tmp_path / "params_rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    checkpoint = load_checkpoint(tmp_path / "last.pt")  # only rank 0 writes; rank 1 would have raced it
    assert checkpoint["iteration"] == 3 and len(checkpoint["rng"]) == 2
    assert checkpoint["data_position"] == {"epoch": 0, "batch": 3}  # 4 batches per process per epoch
    for name, value in rank0.items():
        assert torch.equal(checkpoint["model"][f"{name}"], value), name
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(log) == 3  # one writer: one line per iteration
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
