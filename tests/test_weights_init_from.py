"""init_from: our checkpoints and torchvision's RetinaNet files (random models, saved here: nothing downloaded) into
models with the same classes, other classes, classes matched by name, other anchors, and models that do not fit."""

import math

import pytest
import torch
import yaml
from conftest import tiny_run
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from retinanet.cli import main
from retinanet.config import model_config
from retinanet.model.checkpoint import load_model, save_checkpoint
from retinanet.model.detector import build_from_config
from retinanet.weights.init_from import init_from
from retinanet.weights.torchvision import torchvision_config

NAMES = ("ant", "bee", "cat")
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def _source(tmp_path, **overrides):
    """A tiny model with non-trivial weights everywhere, saved as a checkpoint of ours."""
    torch.manual_seed(1)
    base = dict(num_classes=3, class_names=NAMES, min_size=64, max_size=64)
    cfg = model_config("retinanet_tiny", **{**base, **overrides})
    model = build_from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_checkpoint(tmp_path / "source.pt", model, iteration=7)
    return model, path


def _target(seed=2, **overrides):
    torch.manual_seed(seed)
    base = dict(num_classes=3, class_names=NAMES, min_size=64, max_size=64)
    return build_from_config(model_config("retinanet_tiny", **{**base, **overrides}))


def _weights(model):
    return {k: v for k, v in model.state_dict().items() if k != "loss_normalizer"}


def _rows(weight, k, num_classes, num_anchors):
    """The output channels of class k: a * K + k for every anchor type a."""
    return weight[torch.arange(num_anchors) * num_classes + k]


def test_same_classes_load_everything(tmp_path):
    source, path = _source(tmp_path)
    target = _target()
    report = init_from(target, str(path))
    for key, value in _weights(source).items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert report.loaded == [
        "backbone",
        "fpn",
        "head.cls_tower",
        "head.box_tower",
        "head.box_deltas",
        "head.cls_logits",
    ]
    assert not report.reinitialised and "iteration 7" in report.lines()[0]


def test_other_classes_keep_everything_but_the_class_layer_which_starts_at_the_prior(tmp_path):
    source, path = _source(tmp_path)
    target = _target(num_classes=5, class_names=("a", "b", "c", "d", "e"))
    report = init_from(target, str(path))
    for key, value in _weights(source).items():
        if not key.startswith("head.cls_logits"):
            torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(target.head.cls_logits.bias, torch.full((9 * 5,), PRIOR_BIAS))
    assert abs(target.head.cls_logits.weight.std().item() - 0.01) < 0.001
    assert any("head.cls_logits for 5 of 5 classes with the prior 0.01" in line for line in report.lines())


def test_match_keeps_the_rows_of_classes_found_by_name(tmp_path):
    source, path = _source(tmp_path)
    target = _target(num_classes=3, class_names=("Cat", "wasp", "ant"), init_classes="match")
    report = init_from(target, str(path))
    w, b = target.head.cls_logits.weight, target.head.cls_logits.bias
    sw = source.head.cls_logits.weight
    torch.testing.assert_close(_rows(w, 0, 3, 9), _rows(sw, 2, 3, 9))  # Cat <- cat
    torch.testing.assert_close(_rows(w, 2, 3, 9), _rows(sw, 0, 3, 9))  # ant <- ant
    torch.testing.assert_close(_rows(b, 1, 3, 9), torch.full((9,), PRIOR_BIAS))  # wasp: new
    assert report.kept_classes == [("Cat", "cat"), ("ant", "ant")] and report.new_classes == ["wasp"]
    assert "classification rows kept for 2 classes (Cat <- cat, ant); new: wasp" in "\n".join(report.lines())


def test_other_anchors_per_location_start_both_final_layers_again(tmp_path):
    source, path = _source(tmp_path)
    target = _target(aspect_ratios=(1.0,))  # 3 anchors per location instead of 9
    report = init_from(target, str(path))
    torch.testing.assert_close(target.head.box_tower[0].weight, source.head.box_tower[0].weight)
    assert target.head.box_deltas.weight.shape[0] == 3 * 4 and torch.all(target.head.box_deltas.bias == 0)
    torch.testing.assert_close(target.head.cls_logits.bias, torch.full((3 * 3,), PRIOR_BIAS))
    assert any("head.box_deltas (the source has 9 anchors per location, this model 3)" in x for x in report.lines())
    assert any("anchors differ in ['aspect_ratios']" in x for x in report.lines())


def test_another_architecture_names_the_keys_to_change(tmp_path):
    _, path = _source(tmp_path)
    target = _target(head_convs=3)
    with pytest.raises(ValueError, match=r"does not fit this model: .*set model.head_convs: 2"):
        init_from(target, str(path))
    unnamed = _target(class_names=())
    before = unnamed.head.cls_logits.weight.clone()
    with pytest.raises(ValueError, match="match needs this model's class names"):
        init_from(unnamed, str(path), init_classes="match")
    torch.testing.assert_close(unnamed.head.cls_logits.weight, before)  # nothing changed before the error
    _, path = _source(tmp_path, class_names=())
    with pytest.raises(ValueError, match="carries no class names to match; use model.init_classes=reinit"):
        init_from(_target(), str(path), init_classes="match")


def test_config_checks_the_source_and_the_choice(tmp_path):
    with pytest.raises(ValueError, match="init_from: file not found: .*gone.pt"):
        model_config("retinanet_tiny", init_from=str(tmp_path / "gone.pt"))
    with pytest.raises(ValueError, match="unknown torchvision detector 'torchvision:retinanet_r18'"):
        model_config("retinanet_tiny", init_from="torchvision:retinanet_r18")
    with pytest.raises(ValueError, match="init_classes = 'all' is not one of"):
        model_config("retinanet_tiny", init_classes="all")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="neither a checkpoint written by `retinanet train` nor a torchvision"):
        init_from(_target(), str(bad))


def _torchvision_file(tmp_path, build, name):
    torch.manual_seed(0)
    tv = build(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / name
    torch.save(tv.state_dict(), path)
    return tv, path


@pytest.mark.slow
@pytest.mark.parametrize("build, version", [(retinanet_resnet50_fpn, "v1"), (retinanet_resnet50_fpn_v2, "v2")])
def test_torchvision_files_with_coco_names_matched(tmp_path, build, version):
    tv, path = _torchvision_file(tmp_path, build, f"{version}.pth")
    torch.manual_seed(3)
    cfg = torchvision_config(
        version,
        3,
        min_size=128,
        max_size=128,
        class_names=("person", "widget", "Car"),
        init_classes="match",
        backbone_norm="bn",
        frozen_bn_eps=1e-5,
    )
    target = build_from_config(cfg)
    report = init_from(target, str(path))
    torch.testing.assert_close(target.backbone.conv1.weight, tv.backbone.body.conv1.weight)
    torch.testing.assert_close(target.backbone.layer3[1].bn2.running_var, tv.backbone.body.layer3[1].bn2.running_var)
    torch.testing.assert_close(target.fpn.lateral[2].weight, tv.backbone.fpn.inner_blocks[2][0].weight)
    torch.testing.assert_close(target.fpn.p6.weight, tv.backbone.fpn.extra_blocks.p6.weight)
    torch.testing.assert_close(target.head.cls_tower[0].weight, tv.head.classification_head.conv[0][0].weight)
    torch.testing.assert_close(target.head.box_deltas.weight, tv.head.regression_head.bbox_reg.weight)
    tv_cls = tv.head.classification_head.cls_logits
    torch.testing.assert_close(_rows(target.head.cls_logits.weight, 0, 3, 9), _rows(tv_cls.weight, 1, 91, 9))
    torch.testing.assert_close(_rows(target.head.cls_logits.bias, 2, 3, 9), _rows(tv_cls.bias, 3, 91, 9))
    torch.testing.assert_close(_rows(target.head.cls_logits.bias, 1, 3, 9), torch.full((9,), PRIOR_BIAS))
    assert report.kept_classes == [("person", "person"), ("Car", "car")] and report.new_classes == ["widget"]
    assert f"torchvision RetinaNet), {version}, 91 classes" in report.lines()[0]
    # a model of the paper's layout does not fit v1's P6 (from P5): the message says which keys to set
    if version == "v1":
        with pytest.raises(ValueError, match="model.p6_from: 'p5'"):
            init_from(build_from_config(model_config("retinanet_r50_fpn", num_classes=3)), str(path))


def test_torchvision_download_offline_is_one_clear_error(monkeypatch):
    import urllib.error

    import torchvision.models._api as api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(
        ValueError,
        match="could not download torchvision's retinanet_resnet50_fpn_v2 COCO weights "
        r"from https://.*set model.init_from to its path",
    ):
        init_from(_target(), "torchvision:retinanet_resnet50_fpn_v2")


@pytest.mark.slow
def test_a_run_starts_from_a_checkpoint_and_says_so(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", *tiny_run(first, "train.max_iters=1")]) == 0
    source = first / "last.pt"
    assert main(["train", *tiny_run(second, "train.max_iters=1", f"model.init_from={source}", "train.lr=1.0e-12")]) == 0
    log = (second / "train.log").read_text()
    assert f"init_from {source} (iteration 1, 5 classes): loaded backbone, fpn" in log
    assert yaml.safe_load((second / "config.yaml").read_text())["model"]["init_from"] == str(source)
    # with a negligible lr the weights are the source's; the checkpoint no longer needs the source file
    source_weights = load_model(source).state_dict()
    source.unlink()
    model = load_model(second / "last.pt")
    assert model.config.init_from is None
    for key, value in source_weights.items():
        if "running" not in key and "num_batches" not in key and key != "loss_normalizer":
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    capsys.readouterr()
