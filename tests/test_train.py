import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from retinanet.config import TrainConfig, train_config
from retinanet.model.checkpoint import FORMAT_VERSION, load_checkpoint, load_model, save_checkpoint
from retinanet.model.detector import build_model
from retinanet.runtime import fastpath
from retinanet.runtime.fastpath import CpuInfo
from retinanet.runtime.machine import Cache
from retinanet.train.loop import (
    BatchStream,
    NonFiniteLossError,
    TrainingInterrupted,
    build_optimizer,
    build_scheduler,
    train,
)
from retinanet.train.optim import lr_factor

CHECKPOINT_KEYS = {
    "format_version",
    "iteration",
    "model",
    "model_config",
    "train_config",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "data_position",
    "extra",
    "fast_paths",
    "ema",
}


class TinyBoxes(Dataset):
    """n images 64 px high and 80 or 96 px wide with a bright rectangle (image 3 has none). The brightness and the
    horizontal flip are drawn from torch's global generator, so exact resume needs the generator states restored, not
    only the data order. Every batch pads to 64 x 96 (size_divisible 32), which keeps the CPU tests fast."""

    def __init__(self, n: int = 8):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        h, w = 64, (96 if i % 2 else 80)
        image = torch.rand(3, h, w, generator=g) * 0.3
        boxes = torch.zeros(0, 4)
        if i != 3:
            x0, y0 = 4 + 3 * i, 6 + 2 * i
            image[:, y0 : y0 + 28, x0 : x0 + 24] += 0.6
            boxes = torch.tensor([[x0, y0, x0 + 24, y0 + 28]], dtype=torch.float32)
        image = image * (0.8 + 0.4 * torch.rand(()))  # a random brightness: any generator drift changes the loss
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": torch.full((len(boxes),), i % 2, dtype=torch.int64)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: when other processes hold the two shared cores, two OpenMP threads spin-waiting for
    each other made an iteration of the tiny model ~80x slower (8 s instead of 0.1 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def collate(batch):
    return [image for image, _ in batch], [target for _, target in batch]


def tiny_loader(n: int = 8, batch_size: int = 2) -> DataLoader:
    return DataLoader(TinyBoxes(n), batch_size=batch_size, shuffle=True, collate_fn=collate, num_workers=0)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("retinanet_tiny", num_classes=2, size_divisible=32)


def tiny_config(**overrides) -> TrainConfig:
    settings = dict(
        max_iters=6,
        batch_size=2,
        lr=0.01,
        warmup_iters=1,
        steps=(4,),
        log_every=1,
        checkpoint_every=3,
        num_workers=0,
        device="cpu",
        seed=0,
    )
    return train_config(**{**settings, **overrides})


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def train_losses(folder: Path) -> dict[int, dict[str, float]]:
    return {
        r["iter"]: {k: r[k] for k in ("loss_cls", "loss_box", "loss", "lr")} for r in read_log(folder) if "loss" in r
    }


# ---------------------------------------------------------------------------------------------------------------
# learning-rate schedule and optimiser


def test_lr_factor_paper_schedule():
    paper = dict(warmup_iters=500, warmup_factor=1 / 3, steps=(60_000, 80_000))
    assert lr_factor(0, **paper) == pytest.approx(1 / 3)
    assert lr_factor(250, **paper) == pytest.approx(2 / 3)
    assert lr_factor(500, **paper) == 1.0
    assert lr_factor(59_999, **paper) == 1.0
    assert lr_factor(60_000, **paper) == pytest.approx(0.1)
    assert lr_factor(79_999, **paper) == pytest.approx(0.1)
    assert lr_factor(80_000, **paper) == pytest.approx(0.01)
    assert lr_factor(89_999, **paper) == pytest.approx(0.01)
    # a step inside the warm-up multiplies the warm-up ramp
    assert lr_factor(5, warmup_iters=10, warmup_factor=0.5, steps=(3,)) == pytest.approx(0.1 * 0.75)


def test_lr_factor_cosine_schedule():
    cosine = dict(warmup_iters=10, warmup_factor=0.1, steps=(), cosine_iters=110)
    assert lr_factor(0, **cosine) == pytest.approx(0.1)
    assert lr_factor(5, **cosine) == pytest.approx(0.55)  # the warm-up ramp, with no decay yet
    assert lr_factor(10, **cosine) == pytest.approx(1.0)
    assert lr_factor(60, **cosine) == pytest.approx(0.5)
    assert lr_factor(110, **cosine) == pytest.approx(0.0, abs=1e-12)
    plan = train_config(max_iters=110, warmup_iters=10, lr_schedule="cosine").schedule()
    assert plan.steps == () and "cosine" in plan.describe()


def test_scheduler_drives_optimizer_lr():
    cfg = train_config(lr=0.02, warmup_iters=4, warmup_factor=0.25, steps=(6,))
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.02 * f for f in (0.25, 0.4375, 0.625, 0.8125, 1, 1, 0.1, 0.1)]
    assert lrs == pytest.approx(expected)


def test_build_optimizer_skips_frozen_and_norm_decay():
    model = build_model("retinanet_tiny", num_classes=2, freeze_at=1)
    cfg = train_config(weight_decay=1e-4, weight_decay_norm=0.0)
    optimizer = build_optimizer(model, cfg)
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_groups == trainable and len(trainable) < len(list(model.parameters()))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))
        for p in m.parameters(recurse=False)
        if p.requires_grad
    }
    assert {id(p) for p in no_decay["params"]} == norm_params


def test_adamw_momentum_is_beta1():
    optimizer = build_optimizer(nn.Linear(2, 2), train_config(optimizer="adamw", lr=1e-4, momentum=0.8))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["betas"] == (0.8, 0.999)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown key"):
        train_config(learning_rate=0.1)
    with pytest.raises(ValueError, match="amp"):
        train_config(amp="fp8")
    with pytest.raises(ValueError, match="optimizer"):
        train_config(optimizer="rmsprop")
    assert TrainConfig.from_dict(train_config(steps=(3, 5)).to_dict()) == train_config(steps=(3, 5))


# ---------------------------------------------------------------------------------------------------------------
# data stream


def _int_loader(n: int, batch_size: int) -> DataLoader:
    return DataLoader(list(range(n)), batch_size=batch_size, shuffle=True)


def test_batch_stream_order_depends_only_on_seed_and_epoch():
    stream = BatchStream(_int_loader(7, 3), seed=5)
    flat = [stream.next().tolist() for _ in range(9)]
    assert stream.position == {"epoch": 2, "batch": 3}  # 3 batches per epoch (3 + 3 + 1)
    assert sorted(sum(flat[:3], [])) == list(range(7))
    assert flat[:3] != flat[3:6]  # each epoch its own shuffle
    # a fresh stream restarted at (epoch 1, batch 1) continues with the same batches
    resumed = BatchStream(_int_loader(7, 3), seed=5, epoch=1, batch=1)
    assert [resumed.next().tolist() for _ in range(5)] == flat[4:9]
    # another seed gives another order
    other = BatchStream(_int_loader(7, 3), seed=6)
    assert [other.next().tolist() for _ in range(3)] != flat[:3]


def test_batch_stream_errors():
    with pytest.raises(ValueError, match="no batches"):
        BatchStream(DataLoader([], batch_size=2), seed=0).next()
    with pytest.raises(ValueError, match="cannot resume at batch 5"):
        BatchStream(_int_loader(4, 2), seed=0, epoch=0, batch=5)


# ---------------------------------------------------------------------------------------------------------------
# the loop


def test_train_logs_evaluates_and_checkpoints_with_config(tmp_path):
    model = tiny_model()
    cfg = tiny_config(max_iters=3, eval_every=2, log_every=2)
    calls = []

    def eval_fn(m, iteration):
        calls.append((iteration, m.training))
        return {"AP": 0.5 * iteration}

    result = train(model, tiny_loader(), cfg, tmp_path, eval_fn=eval_fn)
    assert calls == [(2, False), (3, False)] and model.training
    assert result["iteration"] == 3 and result["metrics"] == {"AP": 1.5}
    log = read_log(tmp_path)
    assert [r["iter"] for r in log] == [2, 2, 3, 3]  # train line then eval line, at log_every and at the end
    assert set(log[0]) == {"iter", "loss_cls", "loss_box", "loss", "lr", "time", "data_time", "boxes_without_positive"}
    assert log[1] == {"iter": 2, "eval/AP": 1.0}
    assert log[2]["loss"] == pytest.approx(log[2]["loss_cls"] + log[2]["loss_box"])
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())

    checkpoint = load_checkpoint(result["checkpoint"])
    assert set(checkpoint) == CHECKPOINT_KEYS and checkpoint["format_version"] == FORMAT_VERSION
    assert checkpoint["iteration"] == 3 and checkpoint["data_position"] == {"epoch": 0, "batch": 3}
    assert checkpoint["model_config"] == dataclasses.asdict(model.config)
    assert checkpoint["train_config"] == dataclasses.asdict(cfg)
    assert len(checkpoint["rng"]) == 1 and set(checkpoint["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert checkpoint["fast_paths"] == result["fast_paths"].to_dict()  # the run's choices travel with it
    assert checkpoint["fast_paths"]["memory_format"] == model.memory_format
    assert result["fast_paths"].describe() in (tmp_path / "train.log").read_text()
    rebuilt = load_model(result["checkpoint"])
    assert rebuilt.config == model.config
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name


def interrupt_at(model, iterations: set[int]):
    """Press Ctrl-C (SIGINT to this process) during the loss of the given iterations (1-based, counting this
    run's iterations)."""
    real, calls = model.loss, [0]

    def loss(images, targets, resize=True):
        calls[0] += 1
        if calls[0] in iterations:
            os.kill(os.getpid(), signal.SIGINT)
        return real(images, targets, resize=resize)

    model.loss = loss
    return model


def test_resume_continues_exactly(tmp_path):
    """A fresh uninterrupted run of 6 iterations against the same config stopped by Ctrl-C after iterations 2, 4
    and 5 and resumed each time: with 4 batches per epoch that resumes mid-epoch, exactly at an epoch's end, and
    in the second epoch (where replaying the epoch's batches alone would not bring the random flips back in step:
    the generator states must come from the checkpoint)."""
    model = tiny_model()
    train(model, tiny_loader(), tiny_config(), tmp_path / "uninterrupted")
    expected, expected_state = train_losses(tmp_path / "uninterrupted"), model.state_dict()

    folder = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(interrupt_at(tiny_model(), {2}), tiny_loader(), tiny_config(), folder)
    for previous, stop_after in ((2, 2), (4, 1), (5, None)):
        assert stopped.value.iteration == previous and load_checkpoint(folder / "last.pt")["iteration"] == previous
        # a new model with other weights, the global generators moved on: all must come from the checkpoint
        model = interrupt_at(tiny_model(seed=previous), {stop_after} if stop_after else set())
        torch.rand(1000)
        if stop_after is None:
            train(model, tiny_loader(), tiny_config(), folder, resume=folder / "last.pt")
        else:
            with pytest.raises(TrainingInterrupted) as stopped:
                train(model, tiny_loader(), tiny_config(), folder, resume=folder / "last.pt")

    resumed = train_losses(folder)
    assert sorted(resumed) == list(range(1, 7))  # one history
    for it in range(1, 7):
        assert resumed[it] == expected[it], f"iteration {it}"  # bit-exact
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected_state[name]), name
    assert "Ctrl-C: stopped after iteration 4" in (folder / "train.log").read_text()


def test_a_resumed_run_computes_what_the_original_would_have_whatever_the_cache_holds(tmp_path, monkeypatch):
    """The original run measures contiguous and torch's convolutions; before the resume the cache is emptied and
    every probe would now choose otherwise (channels-last, Winograd): the resumed run takes its checkpoint's
    choices and logs the original's losses bit for bit. A layout forced in the config still wins."""
    monkeypatch.setenv("RETINANET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fastpath, "_CACHE", Cache())
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: {"choice": "contiguous"})
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: {"choice": "direct"})
    train(tiny_model(), tiny_loader(), tiny_config(), tmp_path / "whole")
    with pytest.raises(TrainingInterrupted):
        train(interrupt_at(tiny_model(), {3}), tiny_loader(), tiny_config(), tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["fast_paths"]["memory_format"] == "contiguous"

    monkeypatch.setattr(fastpath, "_CACHE", Cache())
    monkeypatch.setenv("RETINANET_CACHE_DIR", str(tmp_path / "other-cache"))
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: {"choice": "channels_last"})
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: {"choice": "winograd"})
    model = tiny_model()
    result = train(model, tiny_loader(), tiny_config(), tmp_path / "resumed", resume=tmp_path / "resumed" / "last.pt")
    assert result["fast_paths"].origin == "the checkpoint's" and model.memory_format == "contiguous"
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "whole")
    assert "fast paths (the checkpoint's" in (tmp_path / "resumed" / "train.log").read_text()

    torch.manual_seed(0)
    forced = build_model("retinanet_tiny", num_classes=2, size_divisible=32, memory_format="channels_last")
    cfg = tiny_config(max_iters=7)
    with pytest.warns(UserWarning, match=r"model config differs in \['memory_format'\]"):
        result = train(forced, tiny_loader(), cfg, tmp_path / "resumed", resume=tmp_path / "resumed" / "last.pt")
    assert forced.memory_format == "channels_last" == result["fast_paths"].memory_format


def test_two_runs_with_the_same_seed_are_the_same_from_the_first_iteration(tmp_path):
    for name in ("a", "b"):
        train(tiny_model(), tiny_loader(), tiny_config(max_iters=3), tmp_path / name)
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")


def test_second_ctrl_c_stops_at_once(tmp_path):
    model = tiny_model()
    real, calls = model.loss, [0]

    def loss(images, targets, resize=True):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop after this iteration
            os.kill(os.getpid(), signal.SIGINT)  # the second does not wait
        return real(images, targets, resize=resize)

    model.loss = loss
    with pytest.raises(KeyboardInterrupt):
        train(model, tiny_loader(), tiny_config(checkpoint_every=100), tmp_path)
    assert not (tmp_path / "last.pt").exists()  # it stopped before the iteration's checkpoint
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back


def test_resume_drops_log_lines_after_the_checkpoint(tmp_path):
    model = tiny_model()
    optimizer = build_optimizer(model, tiny_config())
    save_checkpoint(
        tmp_path / "last.pt",
        model,
        optimizer,
        build_scheduler(optimizer, tiny_config()),
        iteration=2,
        data_position={"epoch": 0, "batch": 2},
    )
    # the run went on to iteration 3 (and half-wrote a line) before it died
    lines = [json.dumps({"iter": i, "loss": 1.0}) for i in (1, 2, 3)] + ['{"iter": 4, "lo']
    (tmp_path / "log.jsonl").write_text("\n".join(lines))
    train(model, tiny_loader(), tiny_config(max_iters=2), tmp_path, resume=tmp_path / "last.pt")  # nothing to do
    assert [r["iter"] for r in read_log(tmp_path)] == [1, 2]


def test_non_finite_loss_names_the_loss_and_iteration(tmp_path):
    model = tiny_model()
    real_loss, calls = model.loss, []

    def loss_with_nan(images, targets, resize=True):
        losses = real_loss(images, targets, resize=resize)
        calls.append(1)
        if len(calls) == 2:
            losses["loss_box"] = losses["loss_box"] * float("nan")
        return losses

    model.loss = loss_with_nan
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: loss_box = nan") as info:
        train(model, tiny_loader(), tiny_config(max_iters=4, checkpoint_every=1), tmp_path)
    assert "loss_cls" in str(info.value)  # the finite ones are reported too
    assert isinstance(info.value, RuntimeError)
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # stopped before the optimiser step
    assert [r["iter"] for r in read_log(tmp_path)] == [1]


def _cpu(flags: set[str]) -> CpuInfo:
    return CpuInfo("Test CPU", "AVX512" if "avx512f" in flags else "AVX2", None, frozenset(flags))


def test_bf16_is_refused_on_a_cpu_without_native_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "cpu_info", lambda: _cpu({"avx2", "fma"}))
    with pytest.raises(ValueError, match=r"amp 'bf16'.*Test CPU.*no native bfloat16.*amp 'none'"):
        train(tiny_model(), tiny_loader(), tiny_config(amp="bf16"), tmp_path)
    assert not (tmp_path / "last.pt").exists()
    assert fastpath.choose_amp("auto", "cpu") == "none"


def test_bf16_autocast_adamw_and_grad_clip_on_a_cpu_with_native_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "cpu_info", lambda: _cpu({"avx2", "avx512f", "avx512_bf16"}))
    cfg = tiny_config(max_iters=2, amp="bf16", optimizer="adamw", lr=1e-4, grad_clip=1.0)
    result = train(tiny_model(), tiny_loader(), cfg, tmp_path)
    assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed with CUDA")
    with pytest.raises(ValueError, match="fp16"):
        train(tiny_model(), tiny_loader(), tiny_config(amp="fp16"), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def test_load_checkpoint_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage)
    bare = tmp_path / "bare.pt"
    torch.save(nn.Linear(2, 2).state_dict(), bare)
    with pytest.raises(ValueError, match=r"bare.pt.*format_version.*bare state dict"):
        load_checkpoint(bare)
    future = tmp_path / "future.pt"
    torch.save({"format_version": 99, "model": {}}, future)
    with pytest.raises(ValueError, match=r"future.pt.*format_version 99"):
        load_checkpoint(future)


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, nn.Linear(2, 2), iteration=1)
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"\x80\x02partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(ValueError, match=r"cannot write .*last\.pt \(No space left on device\); [\d.]+ GB free in "):
        save_checkpoint(path, nn.Linear(2, 2), iteration=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_save_keeps_previous_checkpoint(tmp_path):
    """A process killed in the middle of writing its second checkpoint: last.pt still holds the first."""
    script = textwrap.dedent(
        """
        import io, os, signal, sys
        import torch
        from torch import nn
        from retinanet.model.checkpoint import save_checkpoint

        path = sys.argv[1]
        save_checkpoint(path, nn.Linear(4, 4), iteration=1)
        real_save = torch.save

        def save_and_die_halfway(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_and_die_halfway
        save_checkpoint(path, nn.Linear(4, 4), iteration=2, extra={"big": torch.zeros(2_000_000)})
        """
    )
    path = tmp_path / "last.pt"
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert load_checkpoint(path)["iteration"] == 1
    partial = [p for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(partial) == 1 and partial[0].name.startswith(".last.pt.") and partial[0].stat().st_size > 1_000_000
    with pytest.raises(ValueError, match=partial[0].name):
        load_checkpoint(partial[0])


# ---------------------------------------------------------------------------------------------------------------
# the moving average, validation during training and the best checkpoint


def test_the_moving_average_is_evaluated_saved_resumed_and_loaded(tmp_path):
    seen = []
    cfg = tiny_config(max_iters=4, eval_every=2, ema_decay=0.9, checkpoint_every=2)
    model = tiny_model()
    result = train(model, tiny_loader(), cfg, tmp_path / "whole", eval_fn=lambda m, it: seen.append(m) or {"AP": 0.1})
    checkpoint = load_checkpoint(tmp_path / "whole" / "last.pt")
    assert checkpoint["ema"]["updates"] == 4 and seen and all(m is not model for m in seen)
    averaged = checkpoint["ema"]["model"]
    assert any(not torch.equal(averaged[k], v) for k, v in checkpoint["model"].items() if v.is_floating_point())
    for k, v in load_model(tmp_path / "whole" / "last.pt").state_dict().items():  # inference gets the average
        assert torch.equal(v, averaged[k]), k
    assert result["iteration"] == 4

    folder = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        train(interrupt_at(tiny_model(), {2}), tiny_loader(), cfg, folder, eval_fn=lambda m, it: {"AP": 0.1})
    train(tiny_model(seed=5), tiny_loader(), cfg, folder, eval_fn=lambda m, it: {"AP": 0.1}, resume=folder / "last.pt")
    resumed = load_checkpoint(folder / "last.pt")["ema"]
    assert resumed["updates"] == 4
    for k, v in averaged.items():
        assert torch.equal(resumed["model"][k], v), k  # the average continues exactly


def test_best_pt_keeps_the_best_evaluation(tmp_path):
    values = iter([0.2, 0.6, 0.4])
    cfg = tiny_config(max_iters=3, eval_every=1)
    train(tiny_model(), tiny_loader(), cfg, tmp_path, eval_fn=lambda m, it: {"AP": next(values), "AP50": 0.5})
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["iteration"] == 2 and best["extra"]["best"] == {"metric": "AP", "value": 0.6, "iteration": 2}
    assert load_checkpoint(tmp_path / "last.pt")["extra"]["best"]["iteration"] == 2
    assert "best.pt: AP 0.6000 at iteration 2" in (tmp_path / "train.log").read_text()
    assert load_model(tmp_path / "best.pt").config == load_model(tmp_path / "last.pt").config


def test_a_model_learning_its_data_by_heart_is_named():
    from retinanet.train.run import memorising

    (line,) = memorising({"AP": 0.05, "train_AP": 0.9}, 300)
    assert "iteration 300" in line and "(0.900)" in line and "(0.050)" in line and "by heart" in line
    assert memorising({"AP": 0.6, "train_AP": 0.8}, 300) == []  # a gap, not a memorised set
    assert memorising({"AP": float("nan"), "train_AP": 0.9}, 300) == []
