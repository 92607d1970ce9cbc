"""Fast paths chosen by measurement: probes (each from an empty cache), their cache per machine shared by processes,
the margin over repeated rounds, the layout tuner, the bf16 rules, and a run's choices as facts of the run."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from retinanet import build_model
from retinanet.model.conv import Conv2d, winograd_conv3x3
from retinanet.runtime import fastpath
from retinanet.runtime.fastpath import CpuInfo, RunFastPaths
from retinanet.runtime.machine import Cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache in a folder of the test: as a new machine would start."""
    monkeypatch.setenv("RETINANET_CACHE_DIR", str(tmp_path))
    fresh = Cache()
    monkeypatch.setattr(fastpath, "_CACHE", fresh)
    monkeypatch.setattr(fastpath, "_CHECKED", set())
    monkeypatch.setattr(fastpath, "NOTES", [])
    monkeypatch.setattr(fastpath, "busy_processes", lambda *a, **k: 0)  # a quiet machine, whatever else runs
    return tmp_path / "fastpaths.json"


def _conv_input(c=32, side=16, grad=False):
    x = torch.randn(2, c, side, side, requires_grad=grad)
    return x, torch.randn(c, c, 3, 3) * 0.05


def _algorithm(x, w, run=None):
    return fastpath.conv3x3_algorithm(x, w, winograd_conv3x3, run)


def _records(cache_file, kind):
    (machine,) = json.loads(cache_file.read_text())["machines"].values()
    return machine[kind]


def test_small_convolutions_are_direct_without_a_probe(cache, monkeypatch):
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: pytest.fail("probed"))
    x, w = _conv_input(c=16)
    assert _algorithm(x, w) == "direct"
    x, w = _conv_input(c=64, side=4)
    assert _algorithm(x, w) == "direct"
    assert not cache.exists()


def test_conv_probe_from_an_empty_cache_once_per_shape_class_and_machine(cache, monkeypatch):
    x, w = _conv_input(grad=True)
    choice = _algorithm(x, w)
    assert choice in ("winograd", "direct")
    ((key, record),) = _records(cache, "conv3x3").items()
    assert "32->32 n2" in key and key.endswith("train nchw")
    assert record["choice"] == choice and record["direct_ms"] > 0 and record["winograd_ms"] > 0
    # the same class again, in this process and in a new one (a new cache reading the file): no second probe
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: pytest.fail("probed again"))
    assert _algorithm(x, w) == choice
    monkeypatch.setattr(fastpath, "_CACHE", Cache())
    assert _algorithm(x, w) == choice
    # inference is another class: measured on its own
    calls = []
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: calls.append(a) or {"choice": "winograd"})
    with torch.no_grad():
        assert _algorithm(x, w) == "winograd"
    assert len(calls) == 1 and calls[0][3] is False


def test_the_other_option_needs_the_margin_in_every_round(monkeypatch):
    """`_compare` keeps the default unless the other option wins every round by MARGIN: a noisy round decides
    nothing. Timed by a fake clock: each call of the option advances it by that option's scripted time."""
    clock = [0.0]
    monkeypatch.setattr(fastpath.time, "perf_counter", lambda: clock[0])

    def decide(default_times, other_times):
        script = {"a": iter([1.0, *default_times]), "b": iter([1.0, *other_times])}  # warm-ups first

        def run(name):
            clock[0] += next(script[name])

        return fastpath._compare("a", "b", run, rounds=3)

    assert decide([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])["choice"] == "b"
    assert decide([1.0, 1.0, 1.0], [0.5, 0.5, 1.2])["choice"] == "a"  # one round lost: the default stays
    assert decide([1.0, 1.0, 1.0], [0.97, 0.97, 0.97])["choice"] == "a"  # faster, but within the margin
    record = decide([1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
    assert record == {"choice": "b", "a_ms": 2000.0, "b_ms": 500.0}  # the medians, for the logs


def test_probing_leaves_the_random_generators_alone(cache):
    x, w = _conv_input()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _algorithm(x, w)
    assert torch.equal(torch.rand(3), expected)


def test_cache_off_keeps_choices_in_memory_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RETINANET_CACHE_DIR", "off")
    monkeypatch.setattr(fastpath, "_CACHE", Cache())
    _algorithm(*_conv_input())
    assert fastpath._CACHE.memory["conv3x3"] and "cache off" in fastpath.summary()


WRITER = textwrap.dedent(
    """
    import sys
    from retinanet.runtime import fastpath
    name, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        fastpath._CACHE.put("test", f"{name}-{i}", {"choice": "direct", "writer": name})
    """
)
READER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    path, done = Path(sys.argv[1]), Path(sys.argv[2])
    end, reads = time.time() + 120, 0
    while not done.exists() and time.time() < end:  # until the writers have finished
        if path.exists():
            json.loads(path.read_text())  # a half-written file would not parse
            reads += 1
    print(reads)
    """
)


def test_processes_sharing_the_cache_file_lose_no_entries_and_never_read_half_a_file(tmp_path):
    env = {**os.environ, "RETINANET_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = tmp_path / "done"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path / "fastpaths.json"), str(done)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, f"w{k}", "40"], env=env) for k in range(4)]
    assert all(w.wait(timeout=120) == 0 for w in writers)
    done.touch()
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0 and int(out) > 0
    entries = _records(tmp_path / "fastpaths.json", "test")
    assert sorted(entries) == sorted(f"w{k}-{i}" for k in range(4) for i in range(40))
    assert not list(tmp_path.glob(".fastpaths.*.tmp"))


def _tiny(**overrides):
    return build_model("retinanet_tiny", num_classes=2, min_size=64, max_size=64, **overrides)


def _batch():
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6, 40, 50]]), "labels": torch.tensor([1])}] * 2
    return images, targets


def test_layout_probe_from_an_empty_cache_times_a_copy(cache):
    model = _tiny().train()
    images, targets = _batch()
    running = model.backbone.bn1.running_mean.clone()
    choice = fastpath.tune(model, images, targets)
    assert model.memory_format == choice
    ((key, record),) = _records(cache, "memory_format").items()
    assert key.endswith("train") and record["choice"] == choice
    assert record["channels_last_ms"] > 0 and record["contiguous_ms"] > 0
    assert torch.equal(model.backbone.bn1.running_mean, running)  # the copy's BatchNorm statistics moved, not ours
    assert all(p.grad is None for p in model.parameters())


def test_tune_sets_the_measured_layout_and_keeps_the_model_as_it_was(cache, monkeypatch):
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = _batch()
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: {"choice": "contiguous"})
    assert fastpath.tune(model, images, targets) == "contiguous"
    assert model.memory_format == "contiguous" and model.backbone.conv1.weight.is_contiguous()
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: pytest.fail("probed again"))
    assert fastpath.tune(_tiny(), images, targets) == "contiguous"  # the same class: from the cache
    assert "memory format contiguous" in fastpath.summary()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_forced_layout_is_kept(cache, monkeypatch):
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: pytest.fail("probed"))
    model = _tiny(memory_format="contiguous")
    assert fastpath.tune(model, _batch()[0]) == "contiguous" and model.memory_format == "contiguous"


def _cpu(flags: set[str], onednn: str | None = None) -> CpuInfo:
    return CpuInfo("Test CPU", "AVX512" if "avx512f" in flags else "AVX2", onednn, frozenset(flags))


def test_native_bf16_needs_the_instructions_and_an_uncapped_onednn():
    assert not _cpu({"avx2"}).native_bf16
    assert _cpu({"avx512f", "avx512_bf16"}).native_bf16
    assert not _cpu({"avx512f", "avx512_bf16"}, onednn="AVX2").native_bf16  # forced to AVX2 kernels
    assert _cpu({"avx512f", "avx512_bf16", "amx_bf16"}).amx
    assert "no native bf16" in _cpu({"avx2"}).describe()


def test_bf16_rules(monkeypatch, cache):
    monkeypatch.setattr(fastpath, "cpu_info", lambda: _cpu({"avx2"}))
    with pytest.raises(ValueError, match="no native bfloat16"):
        fastpath.check_amp("bf16", "cpu")
    assert fastpath.choose_amp("auto", "cpu") == "none" and fastpath.choose_amp("none", "cpu") == "none"
    monkeypatch.setattr(fastpath, "cpu_info", lambda: _cpu({"avx512f", "avx512_bf16"}))
    fastpath.check_amp("bf16", "cpu")
    monkeypatch.setattr(fastpath, "_probe_bf16", lambda: {"choice": "none"})
    assert fastpath.choose_amp("auto", "cpu") == "none"  # native but measured slower: float32
    cache.unlink()  # another machine of the same kind, measured otherwise
    monkeypatch.setattr(fastpath, "_CACHE", Cache())
    monkeypatch.setattr(fastpath, "_probe_bf16", lambda: {"choice": "bf16"})
    assert fastpath.choose_amp("auto", "cpu") == "bf16"


def test_bf16_probe_from_an_empty_cache(cache):
    """This machine's own first use of amp auto: a real probe where bf16 is native, none where it is not."""
    choice = fastpath.choose_amp("auto", "cpu")
    if fastpath.cpu_info().native_bf16:
        ((key, record),) = _records(cache, "amp").items()
        assert record["choice"] == choice and record["none_ms"] > 0 and record["bf16_ms"] > 0
    else:
        assert choice == "none" and not cache.exists()


def test_cpu_info_of_this_machine():
    info = fastpath.cpu_info()
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert info.name in fastpath.summary() and info.name in fastpath.machine_id()


# ---------------------------------------------------------------------------------------------------------------
# a run's choices


def test_a_run_measures_once_and_its_choices_travel_as_a_dict(cache, monkeypatch):
    model = _tiny()
    monkeypatch.setattr(
        fastpath, "_probe_layouts", lambda *a: {"choice": "contiguous", "channels_last_ms": 2.0, "contiguous_ms": 1.0}
    )
    run, lines = fastpath.begin_run(model, _batch(), "none", "cpu")
    assert lines == [] and run.memory_format == "contiguous" and model.memory_format == "contiguous"
    assert run.amp == "none" and run.machine == fastpath.machine_id() and model.fast_paths is run
    assert "memory format contiguous (channels_last 2 ms, contiguous 1 ms" in run.describe()
    assert RunFastPaths.from_dict(run.to_dict()) == run
    assert copy.deepcopy(model).fast_paths is run  # a copy of the model (its moving average) stays in the run


def test_a_resumed_run_takes_its_checkpoints_choices_whatever_the_cache_holds(cache, monkeypatch):
    saved = RunFastPaths(
        fastpath.machine_id(),
        amp="none",
        memory_format="contiguous",
        records={"conv3x3": {"64->64 n2 ~64px train cl": {"choice": "winograd"}}},
    ).to_dict()
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: pytest.fail("probed"))
    monkeypatch.setattr(fastpath, "_CACHE", Cache())
    fastpath._CACHE.memory["conv3x3"] = {"64->64 n2 ~64px train cl": {"choice": "direct"}}  # the cache says otherwise
    model = _tiny()
    run, lines = fastpath.begin_run(model, _batch(), "none", "cpu", saved=saved)
    assert model.memory_format == "contiguous" and run.origin == "the checkpoint's" and lines == []
    x = torch.randn(2, 64, 8, 8, requires_grad=True).contiguous(memory_format=torch.channels_last)
    assert _algorithm(x, torch.randn(64, 64, 3, 3), model.fast_paths) == "winograd"
    assert _algorithm(x, torch.randn(64, 64, 3, 3)) == "direct"  # without the model's choices: the cache's
    # a layout forced in the config still wins
    forced = _tiny(memory_format="channels_last")
    run, _ = fastpath.begin_run(forced, _batch(), "none", "cpu", saved=saved)
    assert forced.memory_format == "channels_last" == run.memory_format


def test_a_run_resumed_on_another_machine_measures_again_and_says_so(cache, monkeypatch):
    saved = RunFastPaths("Another CPU | AVX2 | oneDNN all | torch 0", memory_format="contiguous").to_dict()
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: {"choice": "channels_last"})
    model = _tiny()
    run, lines = fastpath.begin_run(model, _batch(), "none", "cpu", saved=saved)
    assert len(lines) == 1 and "Another CPU" in lines[0] and "measured again" in lines[0]
    assert run.memory_format == "channels_last" == model.memory_format and run.origin == "measured"


def test_a_shared_run_gives_classes_met_later_the_default_without_measuring(cache, monkeypatch):
    run = RunFastPaths(fastpath.machine_id(), shared=True)
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: pytest.fail("a process measured alone"))
    fastpath._CACHE.memory["conv3x3"] = {}
    x, w = _conv_input(grad=True)
    assert _algorithm(x, w, run) == "direct"
    (record,) = run.records["conv3x3"].values()
    assert record == {"choice": "direct", "measured": False}
    assert "1 met after the start" in run.describe()
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: {"choice": "winograd"})
    with torch.no_grad():  # inference (rank 0's evaluation) is measured by the one process that runs it
        assert _algorithm(x.detach(), w, run) == "winograd"


def test_two_models_with_different_choices_run_side_by_side_in_one_process(cache, monkeypatch):
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: pytest.fail("measured: the models' choices were not used"))
    calls = []
    monkeypatch.setattr("retinanet.model.conv.winograd_conv3x3", lambda *a: calls.append(1) or F.conv2d(*a, padding=1))
    x = torch.randn(2, 32, 16, 16)
    key = fastpath._conv_class(x, torch.empty(32, 32, 3, 3), training=False)
    models = {}
    for choice in ("winograd", "direct"):
        run = RunFastPaths(fastpath.machine_id(), records={"conv3x3": {key: {"choice": choice}}})
        conv = Conv2d(32, 32, 3, padding=1)
        models[choice] = torch.nn.Sequential(conv)
        conv.fast_paths = run  # what RetinaNet.use_fast_paths sets on each of its convolutions
    with torch.no_grad():
        for _ in range(2):  # interleaved: neither model's choice leaks into the other's
            models["winograd"](x)
            models["direct"](x)
    assert len(calls) == 2  # the Winograd model's two calls, none of the other's
    model = _tiny()
    run = RunFastPaths(fastpath.machine_id())
    assert model.use_fast_paths(run) is model and all(
        m.fast_paths is run for m in model.modules() if isinstance(m, Conv2d)
    )


# ---------------------------------------------------------------------------------------------------------------
# cached choices that stay true


def _poison_layout(model, images, record):
    key = fastpath._model_class(model, images, True)
    fastpath._CACHE.put("memory_format", key, record)
    return key


def test_a_poisoned_layout_is_measured_again_and_the_log_says_so(cache, monkeypatch):
    model, (images, targets) = _tiny(), _batch()
    # the cache says contiguous is twice as fast; the machine says the opposite
    key = _poison_layout(model, images, {"choice": "contiguous", "channels_last_ms": 10.0, "contiguous_ms": 5.0})
    calls = []

    def probe(model, images, targets, rounds=fastpath.ROUNDS):
        calls.append(rounds)
        return {"choice": "channels_last", "channels_last_ms": 5.0, "contiguous_ms": 10.0}

    monkeypatch.setattr(fastpath, "_probe_layouts", probe)
    assert fastpath.tune(model, images, targets) == "channels_last"
    assert calls == [1, fastpath.ROUNDS]  # a one-round check, then the full measurement
    assert _records(cache, "memory_format")[key]["choice"] == "channels_last"
    (note,) = fastpath.NOTES
    assert "measured again" in note and "quick check" in note and "contiguous" in note
    run, lines = fastpath.begin_run(_tiny(), None, "none", "cpu")  # a run's log takes the notes
    assert note in lines and not fastpath.NOTES


def test_a_quiet_machine_keeps_its_cached_choice_without_measuring_again(cache, monkeypatch):
    model, (images, targets) = _tiny(), _batch()
    _poison_layout(model, images, {"choice": "channels_last", "channels_last_ms": 5.0, "contiguous_ms": 6.0, "busy": 0})
    calls = []

    def probe(model, images, targets, rounds=fastpath.ROUNDS):
        calls.append(rounds)
        return {"choice": "channels_last", "channels_last_ms": 5.5, "contiguous_ms": 6.2}

    monkeypatch.setattr(fastpath, "_probe_layouts", probe)
    assert fastpath.tune(model, images, targets) == "channels_last"
    assert fastpath.tune(_tiny(), images, targets) == "channels_last"
    assert calls == [1] and not fastpath.NOTES  # one quick check per process, and it agreed


def test_a_choice_measured_on_a_busy_machine_is_measured_again_when_it_is_quiet(cache, monkeypatch):
    x, w = _conv_input(grad=True)
    monkeypatch.setattr(
        fastpath, "_probe_conv", lambda *a: {"choice": "winograd", "direct_ms": 9.0, "winograd_ms": 3.0}
    )
    monkeypatch.setattr(fastpath, "busy_processes", lambda *a, **k: 2)
    assert _algorithm(x, w) == "winograd"
    ((key, record),) = _records(cache, "conv3x3").items()
    assert record["busy"] == 2  # how busy the machine was is kept with the choice
    # still busy: the record stands
    monkeypatch.setattr(fastpath, "_CACHE", Cache())
    monkeypatch.setattr(fastpath, "_CHECKED", set())
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: pytest.fail("probed while still busy"))
    assert _algorithm(x, w) == "winograd"
    # quiet now: measured again, and said
    monkeypatch.setattr(fastpath, "_CACHE", Cache())
    monkeypatch.setattr(fastpath, "_CHECKED", set())
    monkeypatch.setattr(fastpath, "busy_processes", lambda *a, **k: 0)
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: {"choice": "direct", "direct_ms": 3.0, "winograd_ms": 4.0})
    assert _algorithm(x, w) == "direct"
    assert _records(cache, "conv3x3")[key] == {"choice": "direct", "direct_ms": 3.0, "winograd_ms": 4.0, "busy": 0}
    assert "while 2 other process(es) computed" in fastpath.NOTES[0]


def test_the_fastpaths_command_shows_and_resets_the_cache(cache, capsys):
    from retinanet.cli import main

    fastpath._CACHE.put(
        "amp", "conv 256->256 n2 64x64 train", {"choice": "bf16", "none_ms": 20.0, "bf16_ms": 5.0, "busy": 1}
    )
    assert main(["fastpaths"]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out and "amp: 1 shape class(es)" in out
    assert "train: bf16 (bf16 5 ms, none 20 ms); measured while 1 other process(es) computed" in out
    assert main(["fastpaths", "--reset"]) == 0
    assert "forgot the 1 measured choices" in capsys.readouterr().out
    assert main(["fastpaths"]) == 0 and "no measured choices yet" in capsys.readouterr().out


def test_every_convolution_of_a_model_asks_with_its_own_fast_paths(monkeypatch):
    model = _tiny(backbone_norm="frozen_bn").eval()  # frozen BatchNorm folded: the backbone's convolutions are ours
    run = RunFastPaths(fastpath.machine_id())
    model.use_fast_paths(run)
    asked = []
    monkeypatch.setattr(fastpath, "conv3x3_algorithm", lambda x, w, kernel, fast: asked.append(fast) or "direct")
    with torch.no_grad():
        model.predict([torch.rand(3, 64, 64)])
    weights = {id(m.weight) for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(asked) > len(weights) // 2  # the folded backbone's 3x3 convolutions, the FPN's and the heads'
    assert all(fast is run for fast in asked)
