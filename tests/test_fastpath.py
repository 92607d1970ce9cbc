"""Fast paths chosen by measurement: probes, their cache per machine, the layout tuner and the bf16 rules."""

import json

import pytest
import torch

from retinanet import build_model, fastpath
from retinanet.fastpath import CpuInfo


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache in a folder of the test: as a new machine would start."""
    monkeypatch.setenv("RETINANET_CACHE_DIR", str(tmp_path))
    fresh = fastpath._Cache()
    monkeypatch.setattr(fastpath, "_CACHE", fresh)
    return tmp_path / "fastpaths.json"


def _conv_input(c=32, side=16, grad=False):
    x = torch.randn(2, c, side, side, requires_grad=grad)
    return x, torch.randn(c, c, 3, 3) * 0.05


def test_small_convolutions_are_direct_without_a_probe(cache, monkeypatch):
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: pytest.fail("probed"))
    x, w = _conv_input(c=16)
    assert fastpath.conv3x3_algorithm(x, w) == "direct"
    x, w = _conv_input(c=64, side=4)
    assert fastpath.conv3x3_algorithm(x, w) == "direct"
    assert not cache.exists()


def test_probe_once_per_shape_class_and_machine(cache, monkeypatch):
    x, w = _conv_input(grad=True)
    choice = fastpath.conv3x3_algorithm(x, w)
    assert choice in ("winograd", "direct")
    saved = json.loads(cache.read_text())
    (machine,) = saved["machines"].values()
    ((key, record),) = machine["conv3x3"].items()
    assert "32->32 n2" in key and key.endswith("train nchw")
    assert record["choice"] == choice and record["direct_ms"] > 0 and record["winograd_ms"] > 0
    # the same class again, in this process and in a new one (a new cache reading the file): no second probe
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: pytest.fail("probed again"))
    assert fastpath.conv3x3_algorithm(x, w) == choice
    monkeypatch.setattr(fastpath, "_CACHE", fastpath._Cache())
    assert fastpath.conv3x3_algorithm(x, w) == choice
    # inference is another class: measured on its own
    calls = []
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: calls.append(a) or {"direct": 1.0, "winograd": 0.5})
    with torch.no_grad():
        assert fastpath.conv3x3_algorithm(x, w) == "winograd"
    assert len(calls) == 1 and calls[0][3] is False


def test_winograd_is_chosen_only_when_clearly_faster(cache, monkeypatch):
    x, w = _conv_input()
    monkeypatch.setattr(fastpath, "_probe_conv", lambda *a: {"direct": 1.0, "winograd": 0.99})
    assert fastpath.conv3x3_algorithm(x, w) == "direct"  # within the margin: the more exact algorithm


def test_probing_leaves_the_random_generators_alone(cache):
    x, w = _conv_input()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    fastpath.conv3x3_algorithm(x, w)
    assert torch.equal(torch.rand(3), expected)


def test_cache_off_keeps_choices_in_memory_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RETINANET_CACHE_DIR", "off")
    monkeypatch.setattr(fastpath, "_CACHE", fastpath._Cache())
    fastpath.conv3x3_algorithm(*_conv_input())
    assert fastpath._CACHE.memory["conv3x3"] and "cache off" in fastpath.summary()


def _tiny():
    return build_model("retinanet_tiny", num_classes=2, min_size=64, max_size=64)


def _batch():
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6, 40, 50]]), "labels": torch.tensor([1])}] * 2
    return images, targets


def test_tune_sets_the_measured_layout_and_keeps_the_model_as_it_was(cache, monkeypatch):
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = _batch()
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: {"channels_last": 2.0, "contiguous": 1.0})
    assert fastpath.tune(model, images, targets) == "contiguous"
    assert model.memory_format == "contiguous" and model.backbone.conv1.weight.is_contiguous()
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: pytest.fail("probed again"))
    assert fastpath.tune(_tiny(), images, targets) == "contiguous"  # the same class: from the cache
    assert "memory format contiguous" in fastpath.summary()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_real_layout_probe_times_a_copy(cache):
    model = _tiny().train()
    images, targets = _batch()
    running = model.backbone.bn1.running_mean.clone()
    times = fastpath._probe_layouts(model, images, targets)
    assert set(times) == {"channels_last", "contiguous"} and all(t > 0 for t in times.values())
    assert torch.equal(model.backbone.bn1.running_mean, running)  # the copy's BatchNorm statistics moved, not ours
    assert all(p.grad is None for p in model.parameters())


def test_a_forced_layout_is_kept(cache, monkeypatch):
    monkeypatch.setattr(fastpath, "_probe_layouts", lambda *a: pytest.fail("probed"))
    model = build_model("retinanet_tiny", num_classes=2, min_size=64, max_size=64, memory_format="contiguous")
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
    monkeypatch.setattr(fastpath, "_probe_bf16", lambda: {"float32": 1.0, "bf16": 2.0})
    assert fastpath.choose_amp("auto", "cpu") == "none"  # native but measured slower: float32
    cache.unlink()  # another machine of the same kind, measured otherwise
    monkeypatch.setattr(fastpath, "_CACHE", fastpath._Cache())
    monkeypatch.setattr(fastpath, "_probe_bf16", lambda: {"float32": 2.0, "bf16": 1.0})
    assert fastpath.choose_amp("auto", "cpu") == "bf16"


def test_cpu_info_of_this_machine():
    info = fastpath.cpu_info()
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert info.name in fastpath.summary()
