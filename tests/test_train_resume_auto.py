"""train.resume: auto (and --resume auto): continue from the output folder's last.pt where there is one, else start
fresh; under torchrun --max-restarts a rank killed mid-run costs the iterations since the last checkpoint (the
restarted ranks meet under their attempt's keys: torchrun's store keeps the killed attempt's)."""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN_2, tiny_run, tiny_settings

from retinanet.cli import main


def _iterations(run: Path) -> list[int]:
    return [json.loads(x)["iter"] for x in (run / "log.jsonl").read_text().splitlines() if '"lr"' in x]


def test_resume_auto_starts_fresh_then_continues(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, "train.max_iters=2"), "--resume", "auto"]) == 0
    assert "resume auto: no checkpoint in" in (run / "train.log").read_text()
    assert main(["train", *tiny_run(run, "train.max_iters=4", "train.resume=auto")]) == 0  # the config key too
    assert "resume auto: continuing from" in (run / "train.log").read_text()
    assert _iterations(run) == [1, 2, 3, 4]
    # a start that failed before its first checkpoint left files: auto replaces them (nothing of it is lost)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("train: {}\n")
    assert main(["train", *tiny_run(half, "train.max_iters=1"), "--resume", "auto"]) == 0
    assert _iterations(half) == [1]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = _children(todo.pop())
        found += children
        todo += children
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(found[0]) if found else None


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_a_rank_killed_under_torchrun_restarts_from_the_last_checkpoint(tmp_path):
    settings = [
        *tiny_settings(),
        "train.batch_size=4",
        "train.max_iters=8",
        "train.checkpoint_every=2",
        "train.resume=auto",
        "train.eval_every=100",
        "train.amp=none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}

    def torchrun(run: Path, restarts: int) -> subprocess.Popen:
        cmd = [
            *TORCHRUN_2,
            f"--max-restarts={restarts}",
            "-m",
            "retinanet.cli",
            "train",
            "--set",
            *settings,
            f"train.output_dir={run}",
        ]
        log = open(tmp_path / f"{run.name}.log", "w")  # a file, not a pipe: nobody reads it while it runs
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        started.append(proc)
        return proc

    def output(run: Path) -> str:
        return (tmp_path / f"{run.name}.log").read_text()[-3000:]

    started: list[subprocess.Popen] = []
    try:
        _kill_and_resume(tmp_path, torchrun, output)
    finally:  # a failed check leaves no launcher or rank behind (torchrun starts each rank in its own session)
        for proc in started:
            if proc.poll() is None:
                for pid in [*_descendants(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def _kill_and_resume(tmp_path: Path, torchrun, output) -> None:
    whole = tmp_path / "whole"
    proc = torchrun(whole, 0)
    assert proc.wait(timeout=300) == 0, output(whole)
    killed = tmp_path / "killed"
    proc = torchrun(killed, 1)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # past the checkpoint at iteration 2: kill rank 1
        if (
            (killed / "last.pt").exists()
            and (killed / "log.jsonl").exists()
            and max(_iterations(killed), default=0) >= 3
        ):
            break
        time.sleep(0.05)
    ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
    assert 1 in ranks, ranks
    os.kill(ranks[1], signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, output(killed)
    ckpt = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 8
    assert "resume auto: continuing from" in (killed / "train.log").read_text()
    assert "1 thread (OMP_NUM_THREADS=1) per process" in (killed / "train.log").read_text()  # torchrun's setting kept
    assert _iterations(killed) == list(range(1, 9))  # the iterations since the checkpoint redone, once in the log
    # the same data order and weights as the run that was never killed
    assert _losses(killed) == pytest.approx(_losses(whole), rel=1e-3)


def test_a_resumed_run_reads_its_checkpoint_once(tmp_path, monkeypatch):
    import retinanet.train.resume as resume

    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, "train.max_iters=2")]) == 0
    reads = []
    real = resume.load_checkpoint
    monkeypatch.setattr(resume, "load_checkpoint", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert main(["train", *tiny_run(run, "train.max_iters=3"), "--resume", str(run / "last.pt")]) == 0
    assert len(reads) == 1 and _iterations(run) == [1, 2, 3]


def test_an_uneven_batch_split_is_an_error_that_names_the_numbers():
    from retinanet.train.distributed import per_process_batch

    assert per_process_batch(8, 2) == 4
    with pytest.raises(
        ValueError,
        match=r"train.batch_size 7 does not split evenly over 2 processes \(3.5 images "
        r"each\): use train.batch_size=6 or 8",
    ):
        per_process_batch(7, 2)
    with pytest.raises(ValueError, match="use train.batch_size=4$"):
        per_process_batch(3, 4)
