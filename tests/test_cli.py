"""The command line end to end on tiny synthetic data, and its clear errors for bad input."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TORCHRUN_2, tiny_run, tiny_settings, wait_for_first_iteration
from PIL import Image

from retinanet.cli import main
from retinanet.data import SyntheticShapes


def _train(tmp_path: Path, *extra: str) -> int:
    return main(["train", *tiny_run(tmp_path / "run", *extra)])


def test_train_eval_detect_end_to_end(tmp_path, capsys):
    # 64 px images seen at 48 px in evaluation and at 40 or 56 px in training: every path resizes
    sizes = ["model.min_size=48", "model.max_size=48", "model.train_min_sizes=[40, 56]"]
    assert _train(tmp_path, "model.score_thresh=0.0", *sizes) == 0  # every image gets detections to compare
    run = tmp_path / "run"
    for name in ("last.pt", "log.jsonl", "config.yaml", "training_curves.png", "eval/metrics.json"):
        assert (run / name).exists(), name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["preset"] == "retinanet_tiny" and saved["train"]["max_iters"] == 3
    assert saved["model"]["class_names"][:2] == ["circle", "square"]  # category names kept with the model
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines if "lr" in x] == [1, 2, 3]

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": saved["data"]}))
    assert (
        main(["eval", "--checkpoint", str(run / "last.pt"), "--config", str(cfg), "--output", str(tmp_path / "ev")])
        == 0
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "VOC_mAP50", "per_class_ap"} <= set(metrics)
    assert (tmp_path / "ev" / "detections.json").exists() and (tmp_path / "ev" / "pr_curves.png").exists()
    # the checkpoint carries the image size: `retinanet eval` of it gives exactly the training run's own numbers
    assert metrics == json.loads((run / "eval" / "metrics.json").read_text())
    detections = (tmp_path / "ev" / "detections.json").read_text()
    assert len(json.loads(detections)) == 4 * 100 and detections == (run / "eval" / "detections.json").read_text()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run / "last.pt"),
                "--config",
                str(cfg),
                "--output",
                str(tmp_path / "ev2"),
                "--min-size",
                "96",
                "--max-size",
                "96",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "ev2" / "detections.json").read_text()) != json.loads(
        (tmp_path / "ev" / "detections.json").read_text()
    )  # another size, other detections
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run / "last.pt"),
                "--config",
                str(cfg),
                "--output",
                str(tmp_path / "ev3"),
                "--set",
                "model.min_size=96",
                "model.max_size=96",
            ]
        )
        == 0
    )
    assert (tmp_path / "ev3" / "detections.json").read_text() == (tmp_path / "ev2" / "detections.json").read_text()

    images = tmp_path / "images"
    images.mkdir()
    ds = SyntheticShapes("val", num_images=2, image_size=(64, 80))
    for i in range(2):
        ds.load_image(i).save(images / f"img{i}.png")
    out = tmp_path / "det"
    detect = ["detect", str(images), "--checkpoint", str(run / "last.pt")]
    assert main([*detect, "--output", str(out), "--score-thresh", "0.0"]) == 0
    result = json.loads((out / "detections.json").read_text())
    assert [Path(r["file"]).name for r in result] == ["img0.png", "img1.png"]
    assert all(d["name"] in ds.category_names for r in result for d in r["detections"])
    assert Image.open(out / "img0.png").size == (80 * 6, 64 * 6)  # small images are drawn enlarged
    bigger = tmp_path / "det96"
    sizes = ["--min-size", "96", "--max-size", "120"]
    assert main([*detect, "--output", str(bigger), "--score-thresh", "0.0", *sizes, "--no-draw"]) == 0
    at_96 = json.loads((bigger / "detections.json").read_text())
    assert at_96 != result  # another size, other detections: the option reaches the model
    from retinanet import load

    predictor = load(run / "last.pt", min_size=96, max_size=120, score_thresh=0.0)
    first = predictor.predict(str(images / "img0.png"))
    assert first.boxes[0].tolist() == pytest.approx(at_96[0]["detections"][0]["box"], abs=0.006)  # JSON: 0.01 px
    capsys.readouterr()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main([*detect, "--output", str(out)]) == 2
    assert "earlier detection" in _error(capsys)  # the folder holds the first detection: refused, kept
    assert main([*detect, "--output", str(out), "--overwrite"]) == 2
    assert "broken.png" in _error(capsys)
    # the failed run left the earlier detection whole: --overwrite replaces files only once new ones are written
    assert json.loads((out / "detections.json").read_text()) == result and (out / "img0.png").exists()
    assert main([*detect, "--output", str(out), "--skip-bad", "--overwrite"]) == 0
    assert "broken.png" in capsys.readouterr().err
    result = json.loads((out / "detections.json").read_text())
    assert [(Path(r["file"]).name, "skipped" in r) for r in result] == [
        ("img0.png", False),
        ("img1.png", False),
        ("broken.png", True),
    ]
    assert main([*detect, "--output", str(out), "--skip-bad", "--overwrite", "--no-draw"]) == 0
    assert not (out / "img0.png").exists()  # the earlier drawings, not written again, are gone
    assert main(["detect", str(tmp_path / "nothing.png"), "--checkpoint", str(run / "last.pt")]) == 2
    assert "nothing.png" in _error(capsys)


def test_resume_from_cli_continues(tmp_path):
    assert _train(tmp_path) == 0
    run = tmp_path / "run"
    resume = ["train", "--set", *tiny_settings(), f"train.output_dir={run}", "train.max_iters=4"]
    assert main([*resume, "--resume", str(run / "last.pt")]) == 0
    iters = [json.loads(x)["iter"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert [i for i in iters][-1] == 4
    # resumed again at its end: nothing to train, said as such
    assert main([*resume, "--resume", str(run / "last.pt")]) == 0
    log = (run / "train.log").read_text()
    assert "nothing left to train: the checkpoint had reached iteration 4" in log
    assert "trained iterations 5..4" not in log


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_config_key(tmp_path, capsys):
    assert _train(tmp_path, "model.gama=2") == 2
    err = _error(capsys)
    assert "gama" in err and "unknown key" in err
    assert main(["train", "--set", "tran.lr=1"]) == 2
    assert "tran" in _error(capsys)


def test_config_file_errors(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in _error(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    assert main(["train", "--config", str(bad)]) == 2
    assert "bad.yaml" in _error(capsys)


def _coco_files(tmp_path: Path, annotations: list[dict], images: list[dict] | None = None, write=True) -> list[str]:
    img_dir = tmp_path / "imgs"
    img_dir.mkdir(exist_ok=True)
    images = images or [
        {"id": 1, "file_name": "a.png", "width": 64, "height": 64},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 64},
    ]
    if write:
        for im in images:
            Image.new("RGB", (64, 64), (90, 120, 30)).save(img_dir / im["file_name"])
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "thing"}]})
    )
    return ["data.format=coco", f"data.train_images={img_dir}", f"data.train_annotations={ann}"]


def _box(i, image_id, bbox, cat=3):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": 1, "iscrowd": 0}


def _train_coco(tmp_path, data, *extra):
    return main(["train", "--set", *tiny_settings(), *data, f"train.output_dir={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize(
    "annotations, expected",
    [
        ([_box(1, 1, [10, 10, 20, 20]), _box(8, 2, [30, 30, -5, 10])], ["ann.json", "annotation id 8 (entry 1"]),
        ([_box(1, 1, [10, 10, 20, 20], cat=99)], ["ann.json", "99"]),
        ([_box(1, 1, [10, 10, 90, 20])], ["ann.json", "image id 1 'a.png' (entry 0"]),
    ],
    ids=["negative-width", "unknown-category", "outside-image"],
)
def test_bad_annotations_name_file_and_index(tmp_path, capsys, annotations, expected):
    assert _train_coco(tmp_path, _coco_files(tmp_path, annotations)) == 2
    err = _error(capsys)
    for word in expected:
        assert word in err


def test_empty_and_malformed_annotation_files(tmp_path, capsys):
    data = _coco_files(tmp_path, [])
    (tmp_path / "ann.json").write_text("")
    assert _train_coco(tmp_path, data) == 2
    assert "ann.json" in _error(capsys)
    (tmp_path / "ann.json").write_text('{"images": [')
    assert _train_coco(tmp_path, data) == 2
    assert "ann.json" in _error(capsys)


def test_missing_and_corrupt_images(tmp_path, capsys):
    data = _coco_files(tmp_path, [_box(1, 1, [10, 10, 20, 20]), _box(2, 2, [5, 5, 30, 30])])
    (tmp_path / "imgs" / "b.png").unlink()
    assert _train_coco(tmp_path, data) == 2
    assert "b.png" in _error(capsys)
    (tmp_path / "imgs" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert _train_coco(tmp_path, data) == 2
    assert "b.png" in _error(capsys)


def test_skip_bad_warns_and_drops(tmp_path, capsys):
    data = _coco_files(tmp_path, [_box(1, 1, [10, 10, 20, 20]), _box(2, 2, [30, 30, -5, 10])])
    capsys.readouterr()
    assert _train_coco(tmp_path, data, "train.batch_size=1", "--skip-bad") == 0
    assert "skipped a box" in capsys.readouterr().err  # one line naming the file, the index and the box
    assert (tmp_path / "run" / "last.pt").exists()
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert len(skipped) == 1 and skipped[0]["dropped"] == "box" and skipped[0]["file"].endswith("b.png")


def test_detect_missing_checkpoint(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["detect", str(image), "--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert "x.pt" in _error(capsys)


def test_non_finite_loss_exit_code(tmp_path, capsys, monkeypatch):
    from retinanet.model.detector import RetinaNet

    original = RetinaNet.loss

    def nan_loss(self, *a, **k):
        out = original(self, *a, **k)
        return {**out, "loss_cls": out["loss_cls"] * float("nan")}

    monkeypatch.setattr(RetinaNet, "loss", nan_loss)
    assert _train(tmp_path) == 3
    err = _error(capsys)
    assert "loss_cls" in err and "iteration 1" in err


@pytest.mark.slow
def test_demo_writes_its_outputs(tmp_path, capsys, monkeypatch):
    import dataclasses

    from retinanet.commands import demo as jobs

    full = jobs.demo_config

    def fewer_images(*args, **kwargs):  # the demo's run as it is, on 64 + 16 of its images: its outputs are tested
        cfg = full(*args, **kwargs)
        return dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, synthetic_train_images=64, synthetic_val_images=16)
        )

    monkeypatch.setattr(jobs, "demo_config", fewer_images)
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--set", "train.max_iters=2", "train.log_every=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "train_seconds"} <= set(metrics)
    assert (out / "training_curves.png").exists()
    assert len(list((out / "val_images").glob("*.png"))) == 8
    assert "AP" in capsys.readouterr().out
    first = (out / "last.pt").stat().st_mtime_ns
    assert main(["demo", "--output", str(out), "--set", "train.max_iters=1"]) == 0  # a demo again replaces it
    assert (out / "last.pt").stat().st_mtime_ns != first and json.loads((out / "metrics.json").read_text())[
        "iterations"
    ] == 1
    assert _train(tmp_path, "train.max_iters=1") == 0
    assert main(["demo", "--output", str(tmp_path / "run")]) == 2  # another run is never replaced by a demo
    assert "holds a training run" in _error(capsys)


@pytest.mark.slow
def test_torchrun_two_processes_from_the_command_line(tmp_path):
    """`torchrun --nproc_per_node 2 -m retinanet.cli train ...`: DDP with gloo on the CPU, loopback only."""
    import os
    import subprocess

    run = tmp_path / "run"
    cmd = [
        *TORCHRUN_2,
        "-m",
        "retinanet.cli",
        "train",
        "--set",
        *tiny_settings(),
        "train.batch_size=4",
        f"train.output_dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 3 and len(ckpt["rng"]) == 2  # both processes' random states were gathered


def test_override_of_the_wrong_type_names_the_key(tmp_path, capsys):
    assert _train(tmp_path, "train.max_iters=abc") == 2
    err = _error(capsys)
    assert "max_iters" in err and "abc" in err
    assert _train(tmp_path, "model.gamma=[1, 2]") == 2
    assert "gamma" in _error(capsys)


def test_non_integer_ids_in_coco_file(tmp_path, capsys):
    data = _coco_files(tmp_path, [_box(1, None, [10, 10, 20, 20])])
    assert _train_coco(tmp_path, data) == 2
    err = _error(capsys)
    assert "ann.json" in err and "annotation id 1 (entry 0" in err and "image_id" in err


def test_bad_image_found_in_a_loader_worker_gives_one_line(tmp_path, capsys):
    data = _coco_files(tmp_path, [_box(1, 1, [10, 10, 20, 20]), _box(2, 2, [5, 5, 30, 30])])
    (tmp_path / "imgs" / "b.png").unlink()
    assert _train_coco(tmp_path, data, "train.num_workers=1") == 2
    err = _error(capsys)
    errors = [line for line in err.splitlines() if line.startswith("retinanet:")]  # the rest is the progress bar
    assert len(errors) == 1 and "b.png" in errors[0] and "Original Traceback" not in err


def _losses(folder: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(x).items() if k.startswith("loss")}
        for x in (folder / "log.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_fresh_runs_with_the_same_seed_give_the_same_losses_from_the_first_iteration(tmp_path, workers):
    for name in ("a", "b"):
        assert (
            main(
                [
                    "train",
                    "--set",
                    *tiny_settings(),
                    f"train.num_workers={workers}",
                    f"train.output_dir={tmp_path / name}",
                ]
            )
            == 0
        )
    first, second = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(first) == 3 and first == second
    assert main(["train", "--set", *tiny_settings(), "train.seed=1", f"train.output_dir={tmp_path / 'c'}"]) == 0
    assert _losses(tmp_path / "c")[0] != first[0]  # the seed matters from the first iteration


def test_the_run_says_what_it_will_do_and_where_its_schedule_was_fitted(tmp_path, capsys):
    assert _train(tmp_path, "train.warmup_iters=50") == 0
    out = capsys.readouterr()
    line = next(x for x in out.out.splitlines() if x.startswith("run: "))
    for part in (
        "8 training images (synthetic, 5 classes)",
        "4 validation images",
        "3 iterations of 2 images",
        "0.8 epochs",
        "shorter side 64",
        "lr 0.001",
        "device cpu",
        "amp none",
        "0 data workers",
    ):
        assert part in line, part
    log = (tmp_path / "run" / "train.log").read_text()
    assert line in log and "warmup_iters 50 is more than a fifth of max_iters 3" in log and "fast paths (" in log


def test_the_summary_names_the_device_the_run_resolved(tmp_path, capsys):
    assert _train(tmp_path, "train.device=auto", "train.max_iters=1") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("run: "))
    assert "device auto" not in line
    assert ("device cuda:0" if torch.cuda.is_available() else "device cpu,") in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_gpu_the_machine_lacks_is_one_line_before_anything_is_written(tmp_path, capsys):
    assert _train(tmp_path, "train.device=cuda") == 2
    assert "device 'cuda' but this machine has no CUDA GPU" in _error(capsys)
    assert not (tmp_path / "run").exists()
    # a command's --device is named as the user set it, not as a training config's key
    assert _train(tmp_path, "train.max_iters=1") == 0
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "imgs" / "a.png")
    assert (
        main(
            [
                "detect",
                str(tmp_path / "imgs"),
                "--checkpoint",
                str(tmp_path / "run" / "last.pt"),
                "--device",
                "cuda",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = _error(capsys)
    assert "use --device cpu" in err and "train.device" not in err and "train config" not in err


def test_bf16_on_a_cpu_without_native_bf16_is_refused_in_one_line_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    from retinanet.runtime import fastpath

    avx2 = fastpath.CpuInfo("AMD EPYC (test)", "AVX2", None, frozenset({"avx2", "fma"}))
    monkeypatch.setattr(fastpath, "cpu_info", lambda: avx2)
    assert _train(tmp_path, "train.amp=bf16") == 2
    err = _error(capsys)
    assert len(err.strip().splitlines()) == 1 and "no native bfloat16" in err and "amp 'none'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("problem", ["missing image", "bad setting", "missing checkpoint"])
def test_problems_are_found_before_anything_is_written(tmp_path, capsys, problem):
    run = tmp_path / "run"
    if problem == "missing image":
        data = _coco_files(tmp_path, [_box(1, 1, [10, 10, 20, 20]), _box(2, 2, [5, 5, 30, 30])])
        (tmp_path / "imgs" / "b.png").unlink()
        assert _train_coco(tmp_path, data) == 2
        assert "b.png" in _error(capsys)
    elif problem == "bad setting":
        assert _train(tmp_path, "model.cls_loss=focall") == 2
        assert "cls_loss = 'focall' is not one of" in _error(capsys)
    else:
        assert _train(tmp_path, "--resume", str(tmp_path / "gone.pt")) == 2
        assert "gone.pt" in _error(capsys)
    assert not run.exists()  # no config.yaml, no log: the run never started


def test_offline_downloads_end_in_one_line(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.models._api as api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    assert _train(tmp_path, "model.backbone=resnet18", "model.backbone_weights=imagenet") == 2
    err = _error(capsys)
    assert "could not download the ImageNet weights of resnet18 from https://" in err
    assert "model.backbone_weights to that file's path" in err and len(err.strip().splitlines()) == 1
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["detect", str(image), "--torchvision", "retinanet_resnet50_fpn"]) == 2
    err = _error(capsys)
    assert "could not download torchvision's retinanet_resnet50_fpn COCO weights" in err
    assert "retinanet detect --torchvision retinanet_resnet50_fpn_coco-" in err


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, workers):
    """`retinanet train` in its own process group, interrupted by SIGINT to the whole group as a terminal's Ctrl-C
    is: the data-loading workers get it too, and the run still saves and ends in one line."""
    import os
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    args = [
        "train",
        "--set",
        *tiny_settings(),
        "train.max_iters=2000",
        "train.checkpoint_every=1000",
        f"train.output_dir={run}",
        f"train.num_workers={workers}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retinanet.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    wait_for_first_iteration(run)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("retinanet: interrupted")]
    assert len(lines) == 1 and "Traceback" not in err
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert 0 < ckpt["iteration"] < 2000 and f"after iteration {ckpt['iteration']}" in lines[0]
    assert f"--resume {run / 'last.pt'}" in lines[0]


def _subcommands(parser):
    """(name, parser) of every command and subcommand, walked from the top parser."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subcommands(sub)


def test_every_command_has_a_handler_is_documented_and_shows_its_defaults():
    from retinanet import cli

    parser = cli._parser()
    commands = dict(_subcommands(parser))
    assert set(commands) >= {
        "train",
        "eval",
        "detect",
        "export",
        "demo",
        "anchors",
        "inspect",
        "analyze",
        "loss-curves",
        "examples",
        "loss-cdf",
        "ablate",
    }
    for name, sub in commands.items():
        if name == "analyze":  # a group of analyses, each with its own handler
            continue
        assert sub.get_default("handler") is not None, name
        assert f"retinanet {name}" in cli.__doc__ or f"analyze {name}" in cli.__doc__, f"{name} not in the docstring"
        options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        assert all(a.help for a in options), (name, [a.dest for a in options if not a.help])
        text = " ".join(sub.format_help().split())
        assert text.count("(default: ") >= len(options), f"{name}: an option's help does not show its default"


def test_cli_defaults_equal_the_configs_or_say_why():
    from retinanet import cli
    from retinanet.config import ModelConfig, TrainConfig

    commands = dict(_subcommands(cli._parser()))
    for name in ("eval", "detect", "loss-cdf"):
        assert commands[name].get_default("device") == TrainConfig().device
    detect = commands["detect"]
    (score,) = [a for a in detect._actions if a.dest == "score_thresh"]
    assert score.default != ModelConfig().score_thresh and str(ModelConfig().score_thresh) in score.help


def test_help_answers_at_once_without_loading_torch():
    import subprocess
    import sys

    code = (
        "import sys; from retinanet.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("False"), done.stdout + done.stderr


def test_validation_during_training_logs_the_gap_keeps_the_best_and_draws_the_curves(tmp_path):
    assert (
        _train(
            tmp_path,
            "train.eval_every=2",
            "train.max_iters=4",
            "train.eval_train_images=4",
            "train.ema_decay=0.9",
            "data.augment=top_down",
        )
        == 0
    )
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/AP" in r]
    assert [r["iter"] for r in evals] == [2, 4] and all("eval/train_AP" in r for r in evals)
    assert (run / "best.pt").exists() and (run / "training_curves.png").exists()
    from retinanet.model import load_checkpoint

    assert load_checkpoint(run / "last.pt")["ema"]["updates"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["augment"] == "top_down"
