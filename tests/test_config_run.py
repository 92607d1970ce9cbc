"""The run config: sources named in errors, moved keys, validation up front, and schedules that fit the run."""

import pytest
import yaml

from retinanet.config import load_run_config, train_config


def _yaml(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_bad_key_is_named_with_its_source(tmp_path):
    path = _yaml(tmp_path, {"model": {"preset": "retinanet_tiny", "gama": 2}})
    with pytest.raises(ValueError, match=r"run\.yaml: model: unknown key\(s\) \['gama'\]"):
        load_run_config(path)  # the file, not the preset
    good = _yaml(tmp_path, {"model": {"preset": "retinanet_tiny"}})
    with pytest.raises(ValueError, match=r"^command line \(--set\): train: unknown key\(s\) \['lrr'\]"):
        load_run_config(good, ["train.lrr=0.1"])  # the command line, not the file


def test_values_outside_their_choices_are_found_at_load(tmp_path):
    with pytest.raises(ValueError, match=r"cls_loss = 'focall' is not one of \['focal', 'focal_star'"):
        load_run_config(None, ["model.cls_loss=focall"])
    with pytest.raises(ValueError, match=r"backbone_weights: file not found: nowhere\.pth"):
        load_run_config(None, ["model.backbone_weights=nowhere.pth"])
    with pytest.raises(ValueError, match=r"fg_iou needs 0 < bg_iou"):
        load_run_config(None, ["model.bg_iou=0.6"])
    with pytest.raises(ValueError, match=r"amp = 'fp8'"):
        load_run_config(None, ["train.amp=fp8"])


def test_type_errors_read_as_english():
    with pytest.raises(ValueError, match=r"max_iters = 'abc' is not an integer \(the default is 90000\)"):
        load_run_config(None, ["train.max_iters=abc"])
    with pytest.raises(ValueError, match=r"gamma = \[1, 2\] is not a number"):
        load_run_config(None, ["model.gamma=[1, 2]"])


def test_a_type_error_names_the_declared_default_not_the_files_value(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  max_iters: 1234\n")
    with pytest.raises(ValueError, match=r"max_iters = 'abc' is not an integer \(the default is 90000\)"):
        load_run_config(config, ["train.max_iters=abc"])


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.grad_clip=abc", r"train: grad_clip = 'abc' is not a number or null \(the default is None\)"),
        ("model.backbone_weights=5", r"model: backbone_weights = 5 is not a string or null"),
        ("model.train_min_sizes=[abc]", r"model: train_min_sizes = \['abc'\] is not a list of integers"),
        ("model.box_coder_weights=[1, 1, 1]", r"box_coder_weights = \[1, 1, 1\] is not a list of 4 values"),
        ("train.device=gpu", r"train: device = 'gpu' is not one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
        ("train.steps=[0.5, 2]", r"steps must be positive and increasing .* got \[0.5, 2\]"),
    ],
)
def test_fields_that_default_to_none_or_hold_lists_are_checked_by_their_declared_type(item, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, [item])


def test_declared_types_still_take_what_they_declare():
    cfg = load_run_config(
        None,
        [
            "train.grad_clip=5",
            "model.train_min_sizes=[640, 800]",
            "train.device=cuda:1",
            "train.steps=[0.5, 60000]",
            "model.ohem_neg_pos_ratio=null",
        ],
    )
    assert cfg.train.grad_clip == 5.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.model.train_min_sizes == (640, 800) and cfg.train.steps == (0.5, 60000)
    assert cfg.train.device == "cuda:1" and cfg.model.ohem_neg_pos_ratio is None


def test_moved_keys_say_where_they_went(tmp_path):
    with pytest.raises(ValueError, match=r"data\.train_min_sizes has moved to model\.train_min_sizes"):
        load_run_config(_yaml(tmp_path, {"data": {"train_min_sizes": [640]}}))
    with pytest.raises(ValueError, match=r"data\.eval_min_size has moved to model\.min_size"):
        load_run_config(None, ["data.eval_min_size=600"])
    with pytest.raises(ValueError, match=r"train\.channels_last has moved to model\.memory_format"):
        load_run_config(None, ["train.channels_last=false"])


def test_command_line_overrides_the_file_and_a_preset_there_resets_the_model(tmp_path):
    path = _yaml(tmp_path, {"model": {"preset": "retinanet_tiny", "min_size": 160}, "train": {"lr": 0.02}})
    cfg = load_run_config(path, ["train.lr=0.05", "model.max_size=200"])
    assert cfg.preset == "retinanet_tiny" and cfg.model.min_size == 160 and cfg.model.max_size == 200
    assert cfg.train.lr == 0.05
    assert cfg.model.training_sizes == (160,)


def test_schedule_fits_any_run_length():
    paper = train_config().schedule()
    assert paper.steps == (60_000, 80_000) and paper.warmup_iters == 500 and not paper.warnings
    short = train_config(max_iters=60).schedule()
    assert short.steps == (40, 53) and short.warmup_iters == 12
    assert any("warmup_iters 500 is more than a fifth of max_iters 60" in w for w in short.warnings)
    late = train_config(max_iters=60, warmup_iters=5, steps=(30, 80_000)).schedule()
    assert late.steps == (30, 80_000) and any("[80000]" in w and "never decays" in w for w in late.warnings)


def test_workers_are_capped_by_the_cores(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert train_config().workers() == (1, None)  # None: one fewer than the cores, at most 4
    workers, warning = train_config(num_workers=8).workers()
    assert workers == 2 and "more than this machine's 2 cores" in warning
    assert train_config(num_workers=0).workers() == (0, None)
