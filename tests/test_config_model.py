import math

import pytest

from retinanet.config import PRESETS, ModelConfig, apply_overrides, model_config


def test_default_is_the_papers_model():
    cfg = ModelConfig()
    assert cfg.backbone == "resnet50" and cfg.fpn_channels == 256 and cfg.head_channels == 256 and cfg.head_convs == 4
    assert cfg.p6_from == "c5"
    assert cfg.anchor_sizes == (32, 64, 128, 256, 512)
    assert cfg.anchor_scales == pytest.approx((1.0, 2 ** (1 / 3), 2 ** (2 / 3)))
    assert cfg.aspect_ratios == (0.5, 1.0, 2.0)
    assert (cfg.fg_iou, cfg.bg_iou) == (0.5, 0.4)
    assert (cfg.cls_loss, cfg.alpha, cfg.gamma, cfg.prior_prob) == ("focal", 0.25, 2.0, 0.01)
    assert (cfg.score_thresh, cfg.topk_candidates, cfg.nms_thresh, cfg.detections_per_image) == (0.05, 1000, 0.5, 100)
    assert cfg.box_clamp == pytest.approx(math.log(1000 / 16))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name):
    cfg = model_config(name)
    assert cfg == PRESETS[name]
    assert cfg is not PRESETS[name]  # a copy: overriding it cannot change the preset


def test_overrides_replace_fields_and_leave_the_preset_alone():
    cfg = model_config("retinanet_tiny", num_classes=3, min_size=96, aspect_ratios=[1.0, 2.0])
    assert (cfg.num_classes, cfg.min_size, cfg.aspect_ratios) == (3, 96, (1.0, 2.0))
    assert cfg.backbone == "resnet10"
    assert PRESETS["retinanet_tiny"].num_classes == 80 and PRESETS["retinanet_tiny"].min_size == 256


def test_unknown_override_names_the_key():
    with pytest.raises(ValueError, match="num_clases"):
        model_config("retinanet_r50_fpn", num_clases=3)


def test_unknown_preset_names_it():
    with pytest.raises(ValueError, match="retinanet_r9000"):
        model_config("retinanet_r9000")


def test_dict_round_trip_turns_lists_into_tuples():
    cfg = model_config(
        "retinanet_tiny", num_classes=4, anchor_sizes_per_level=[[16, 20], [32, 40], [64, 80], [128, 160], [256, 320]]
    )
    data = cfg.to_dict()
    assert isinstance(data["aspect_ratios"], list)
    back = ModelConfig.from_dict(data)
    assert back == cfg
    assert back.anchor_sizes_per_level[0] == (16, 20)


def test_from_dict_rejects_unknown_keys_naming_where():
    with pytest.raises(ValueError, match=r"my\.yaml.*bogus"):
        ModelConfig.from_dict({"bogus": 1}, where="my.yaml")
    with pytest.raises(ValueError, match="bogus"):
        apply_overrides(ModelConfig(), {"bogus": 1})


def test_auto_backbone_norm_follows_the_weights(tmp_path):
    import torch
    import torchvision

    from retinanet import build_model

    scratch = build_model("retinanet_r18_fpn", num_classes=2)
    assert (scratch.config.backbone_norm, scratch.config.freeze_at) == ("bn", 0)  # frozen random BN normalises nothing
    assert isinstance(scratch.backbone.bn1, torch.nn.BatchNorm2d) and scratch.backbone.conv1.weight.requires_grad
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    pretrained = build_model("retinanet_r18_fpn", num_classes=2, backbone_weights=str(path))
    assert (pretrained.config.backbone_norm, pretrained.config.freeze_at) == ("frozen_bn", 2)
    assert not pretrained.backbone.layer1[0].conv1.weight.requires_grad
    forced = build_model("retinanet_r18_fpn", num_classes=2, backbone_norm="frozen_bn", freeze_at=1)
    assert (forced.config.backbone_norm, forced.config.freeze_at) == ("frozen_bn", 1)
