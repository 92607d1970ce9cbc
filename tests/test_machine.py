"""The thread budget: each process the project starts takes its share of the cores, never all of them each."""

import torch
from torch.utils.data import Dataset

from retinanet.data import make_loader
from retinanet.runtime.machine import set_threads, thread_budget, usable_cores


def test_omp_num_threads_is_respected_as_it_is(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert thread_budget() == (1, "OMP_NUM_THREADS=1")


def test_torchruns_processes_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr("retinanet.runtime.machine.usable_cores", lambda: 16)
    assert thread_budget() == (8, "16 usable cores shared by 2 processes")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more processes than cores: one thread each, not zero
    assert thread_budget()[0] == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert thread_budget() == (16, "the 16 usable cores")


def test_set_threads_sets_torchs_intra_op_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(usable_cores()))
    try:
        assert set_threads().startswith("1 thread (")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class _Threads(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        empty = {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "orig_size": (8, 8),
            "iscrowd": torch.zeros(0, dtype=torch.bool),
        }
        return torch.zeros(3, 8, 8), {**empty, "image_id": torch.get_num_threads()}  # the worker's threads


def test_data_workers_take_one_thread_each():
    loader = make_loader(_Threads(), 2, shuffle=False, num_workers=1)
    _, targets = next(iter(loader))
    assert [t["image_id"] for t in targets] == [1, 1]
