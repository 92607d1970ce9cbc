"""The mistakes users make, each answered in one line before any work is lost: output folders that hold a run,
bad input found before training, --skip-bad that skips what it says, read-only folders, image modes, large images,
inputs accepted silently, SIGTERM, and output a user reads (progress lines, strict JSON)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run, tiny_settings, wait_for_first_iteration
from PIL import Image

from retinanet import build_model
from retinanet.cli import main
from retinanet.data.base import load_rgb
from retinanet.inference import Predictor, read_image, run_inference
from retinanet.model import save_checkpoint


def _csv_set(folder: Path, n: int = 8, size=(64, 64), bad: dict | None = None) -> Path:
    """n noise images with one box each, and train.csv / val.csv naming them; `bad` {index: line} replaces lines."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        pixels = (rng.random((size[0], size[1], 3)) * 255).astype(np.uint8)
        pixels[10:30, 12:40] = 255
        Image.fromarray(pixels).save(folder / f"im{i}.png")
        lines.append(f"im{i}.png,12,10,40,30,box")
    for i, line in (bad or {}).items():
        lines[i] = line
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    (folder / "val.csv").write_text("\n".join(lines[:2]) + "\n")
    return folder


def _csv_run(folder: Path) -> list[str]:
    return [
        "data.format=csv",
        f"data.train_annotations={folder / 'train.csv'}",
        f"data.val_annotations={folder / 'val.csv'}",
        "data.synthetic_train_images=0",
    ]


def _one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# 1. a run never overwrites another run's files


def test_a_new_run_into_an_existing_run_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, "train.max_iters=2")]) == 0
    (run / "eval" / "old.txt").write_text("from the first run")
    last, log = (run / "last.pt").read_bytes(), (run / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", *tiny_run(run, "train.max_iters=1")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "holds a training run already" in line and "--resume" in line and "--overwrite" in line
    assert (run / "last.pt").read_bytes() == last and (run / "log.jsonl").read_text() == log  # nothing touched
    # --overwrite with bad data: the run fails at its checks, the earlier run stays whole
    assert main(["train", *tiny_run(run, "model.gama=1"), "--overwrite"]) == 2
    assert (run / "last.pt").read_bytes() == last
    assert main(["train", *tiny_run(run, "train.max_iters=1"), "--overwrite"]) == 0
    assert not (run / "eval" / "old.txt").exists() and (run / "last.pt").read_bytes() != last
    assert [json.loads(x)["iter"] for x in (run / "log.jsonl").read_text().splitlines() if "lr" in x] == [1]


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_after_the_first(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 1:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_the_first)
    assert main(["train", *tiny_run(run, "train.max_iters=4", "train.checkpoint_every=2")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"cannot write {run}{os.sep}" in line and ".pt (No space left on device)" in line and "GB free in" in line
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["iteration"] == 2  # whole
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_training_set_smaller_than_a_batch_is_said_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, "data.synthetic_train_images=3", "train.batch_size=4")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "the training set has 3 image(s), fewer than one batch of train.batch_size = 4" in line
    assert "train.batch_size=3" in line
    assert not run.exists()  # the next run is not refused for a half-made folder


def test_a_run_folder_without_a_checkpoint_names_no_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {}\n")
    assert main(["train", *tiny_run(run, "train.max_iters=1")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "holds a training run already" in line and "--resume" not in line and "no checkpoint" in line


def _tiny_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("retinanet_tiny", num_classes=1, min_size=64, max_size=64, class_names=("box",))
    return save_checkpoint(folder / "tiny.pt", model)


def test_detect_writes_only_its_own_files(tmp_path, capsys):
    images = _csv_set(tmp_path / "data")
    checkpoint = _tiny_checkpoint(tmp_path)
    out = tmp_path / "detect"
    to_out = ["--checkpoint", str(checkpoint), "--output", str(out)]
    assert main(["detect", str(images / "im0.png"), str(images / "im1.png"), *to_out, "--workers", "0"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["im0.png", "im1.png"]
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["detect", str(images / "im2.png"), *to_out]) == 2
    assert "--overwrite" in _one_line(capsys.readouterr().err)
    assert main(["detect", str(images / "im2.png"), *to_out, "--workers", "0", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["im2.png"]  # the earlier drawings are gone
    assert (out / "notes.txt").read_text() == "mine"  # the user's own file stays


# ---------------------------------------------------------------------------------------------------------------
# 2. bad input found before anything is written


@pytest.mark.parametrize("damage", ["box outside", "truncated image"])
def test_bad_csv_input_is_found_before_the_first_iteration(tmp_path, capsys, damage):
    bad = {5: "im5.png,12,10,90,30,box"} if damage == "box outside" else {}
    data = _csv_set(tmp_path / "data", bad=bad)
    if damage == "truncated image":
        png = (data / "im5.png").read_bytes()
        (data / "im5.png").write_bytes(png[: len(png) // 2])
    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, *_csv_run(data))]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "im5.png" in line and ("line 6" in line if damage == "box outside" else "truncated" in line)
    assert not (run / "config.yaml").exists() and not (run / "log.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. --skip-bad skips what it says, box by box, and lists it


def test_skip_bad_skips_a_corrupt_image_and_a_bad_box_alone_and_lists_them(tmp_path, capsys):
    data = _csv_set(tmp_path / "data")
    (data / "im3.png").write_bytes(b"not a png at all")
    with (data / "train.csv").open("a") as f:
        f.write("im4.png,20,20,20,25,box\n")  # zero width: this box goes, im4 stays
    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, *_csv_run(data)), "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "Warning" not in err and err.count("retinanet: skipped") == 2
    skipped = json.loads((run / "skipped.json").read_text())
    assert {(Path(s["file"]).name, s["dropped"]) for s in skipped} == {("im3.png", "image"), ("im4.png", "box")}
    assert all(s["index"] is not None and s["reason"] for s in skipped)
    assert "7 training images" in (run / "train.log").read_text()  # im4 trained with its good box

    out = tmp_path / "detect"
    checkpoint = _tiny_checkpoint(tmp_path)
    assert (
        main(
            ["detect", str(data), "--checkpoint", str(checkpoint), "--output", str(out), "--skip-bad", "--workers", "0"]
        )
        == 0
    )
    records = json.loads((out / "detections.json").read_text())
    (left_out,) = [r for r in records if "skipped" in r]
    assert Path(left_out["file"]).name == "im3.png" and left_out["skipped"]
    assert [Path(s["file"]).name for s in json.loads((out / "skipped.json").read_text())] == ["im3.png"]


# ---------------------------------------------------------------------------------------------------------------
# 4. a read-only output folder: one line before the work


@contextmanager
def _read_only_folder(tmp_path: Path):
    """A folder no file can be written in: chmod for a user; for root (whom permissions do not stop) a read-only
    tmpfs, or where mounting is not allowed the read-only /sys."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        yield Path("/sys/retinanet-read-only-test")
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_read_only_output_folder_is_one_line_before_any_work(tmp_path, capsys):
    data = _csv_set(tmp_path / "data")
    checkpoint = _tiny_checkpoint(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{format: csv, train_annotations: {data / 'train.csv'}, val_annotations: {data / 'val.csv'}}}\n"
    )
    with _read_only_folder(tmp_path) as ro:
        commands = {
            "train": ["train", *tiny_run(ro / "run", *_csv_run(data))],
            "detect": ["detect", str(data / "im0.png"), "--checkpoint", str(checkpoint), "--output", str(ro / "d")],
            "eval": ["eval", "--checkpoint", str(checkpoint), "--config", str(config), "--output", str(ro / "e")],
            "export": ["export", "--checkpoint", str(checkpoint), "--output", str(ro / "m.onnx")],
            "anchors": [
                "anchors",
                "--config",
                str(config),
                "--set",
                "model.preset=retinanet_tiny",
                "--output",
                str(ro / "a"),
            ],
        }
        for name, argv in commands.items():
            started = time.perf_counter()
            assert main(argv) == 2, name
            line = _one_line(capsys.readouterr().err)
            assert "cannot write" in line and str(ro) in line, (name, line)
            assert time.perf_counter() - started < 10, f"{name} did its work before failing"


# ---------------------------------------------------------------------------------------------------------------
# 5. image modes


MODES = ["L", "LA", "P", "I;16", "RGBA", "CMYK"]


def _image_of_mode(mode: str) -> Image.Image:
    grey = np.tile(np.linspace(0, 1, 64), (32, 1))  # dark on the left, bright on the right
    if mode == "I;16":
        return Image.fromarray((grey * 4000).astype(np.uint16))  # 12-bit data in a 16-bit image
    rgb = Image.fromarray(np.stack([(grey * 255).astype(np.uint8)] * 3, -1), "RGB")
    if mode == "P":  # a palette of the picture's own 64 greys (the default web palette would dither them)
        return rgb.convert(mode, palette=Image.Palette.ADAPTIVE, colors=64)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_reads_as_its_picture(tmp_path, mode):
    image = _image_of_mode(mode)
    path = tmp_path / ("im.tif" if mode == "CMYK" else "im.png")
    image.save(path)
    for pixels in (np.asarray(load_rgb(path, "test")), read_image(path).permute(1, 2, 0).numpy()):
        assert pixels.shape == (32, 64, 3) and pixels.dtype == np.uint8
        row = pixels[16].astype(int).mean(1)
        assert row[0] < 40 and row[-1] > 200 and (np.diff(row) >= -2).all(), (mode, row[::8])  # not clipped white
    if mode == "I;16":  # scaled by the image's range: its brightest pixel is white, its middle grey
        assert np.asarray(load_rgb(path, "test"))[16, 32, 0] == pytest.approx(130, abs=3)


# ---------------------------------------------------------------------------------------------------------------
# 6. large images: a hint; labels readable


def test_a_large_image_without_tiles_and_a_full_cap_get_a_hint(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("retinanet_tiny", num_classes=1, min_size=64, max_size=64, detections_per_image=5)
    path = tmp_path / "mosaic.png"
    Image.fromarray((np.random.default_rng(0).random((600, 640, 3)) * 255).astype(np.uint8)).save(path)
    run_inference(Predictor(model, score_thresh=0.0), [path], tmp_path / "out", workers=0, draw=False, progress=False)
    err = capsys.readouterr().err
    assert "larger than the model's 64-64 px were shrunk to it" in err and "--tile 64" in err
    assert "reached the model's cap of 5 detections" in err


def test_labels_stay_readable_on_large_images():
    from retinanet.inference.drawing import label_style

    small, large = label_style((300, 400)), label_style((4000, 6000))
    assert 10 <= small[0] <= 20 and large[0] <= 20 and large[1] <= 4


# ---------------------------------------------------------------------------------------------------------------
# 7. accepted silently, or with a misleading message


def test_a_coco_file_without_annotations_is_refused(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "annotations": [],
        "categories": [{"id": 1, "name": "box"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    coco = [
        "data.format=coco",
        f"data.train_images={tmp_path / 'images'}",
        f"data.train_annotations={tmp_path / 'ann.json'}",
    ]
    assert main(["train", *tiny_run(tmp_path / "run", *coco)]) == 2
    assert "no boxes at all" in _one_line(capsys.readouterr().err)


def test_num_classes_against_the_data_is_said(tmp_path, capsys):
    data = _csv_set(tmp_path / "data")
    assert main(["train", *tiny_run(tmp_path / "run", *_csv_run(data), "model.num_classes=3")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "num_classes = 3 but the training data has 1 classes (box)" in line and "leave" in line


def test_eval_without_config_takes_the_runs_own(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, "train.max_iters=1")]) == 0
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--output", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "AP" in metrics
    alone = tmp_path / "alone.pt"
    alone.write_bytes((run / "last.pt").read_bytes())
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(alone), "--output", str(tmp_path / "e2")]) == 2
    assert "give --config" in _one_line(capsys.readouterr().err)


def test_an_onnx_file_given_as_a_checkpoint_is_named(tmp_path, capsys):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x08\x09\x12\x07pytorch")  # the first fields of an ONNX ModelProto
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(fake),
                "--output",
                str(tmp_path / "e"),
                "--config",
                str(tmp_path / "none.yaml"),
            ]
        )
        == 2
    )
    capsys.readouterr()
    assert main(["detect", str(fake), "--checkpoint", str(fake), "--output", str(tmp_path / "d")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "ONNX model, not a checkpoint" in line and "--onnx" in line and "weights_only" not in line


def test_resuming_with_another_batch_size_is_said_at_once(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, "train.max_iters=2")]) == 0
    capsys.readouterr()
    assert (
        main(["train", *tiny_run(run, "train.max_iters=4", "train.batch_size=4"), "--resume", str(run / "last.pt")])
        == 2
    )
    line = _one_line(capsys.readouterr().err)
    assert "train.batch_size 2" in line and "train.batch_size=2" in line and "init_from" in line


# ---------------------------------------------------------------------------------------------------------------
# 8. SIGTERM saves as Ctrl-C does; checkpoints by time


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        "--set",
        *tiny_settings(),
        "train.max_iters=2000",
        "train.checkpoint_every=1000",
        f"train.output_dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retinanet.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_for_first_iteration(run)
    proc.send_signal(signal.SIGTERM)  # what `timeout`, Docker, Kubernetes and SLURM send
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert 0 < checkpoint["iteration"] < 2000 and "--resume" in err and "Traceback" not in err
    assert "SIGTERM: stopped after iteration" in (run / "train.log").read_text()


def test_checkpoints_by_time_besides_iterations(tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run(
                    run,
                    "train.checkpoint_every=1000",
                    "train.checkpoint_minutes=0.000001",
                    "train.keep_all_checkpoints=true",
                ),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in run.glob("iter_*.pt")) == [f"iter_000000{i}.pt" for i in (1, 2, 3)]


# ---------------------------------------------------------------------------------------------------------------
# 9. output a user reads


def test_redirected_training_output_is_lines_not_a_progress_bar(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "retinanet.cli", "train", *tiny_run(run, "train.max_iters=4", "train.log_every=2")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stdout + done.stderr
    assert "train: iteration 2/4" in done.stdout and "train: iteration 4/4" in done.stdout


def test_a_file_named_twice_is_detected_once(tmp_path):
    from retinanet.inference import image_files

    data = _csv_set(tmp_path / "data", n=2)
    (tmp_path / "list.txt").write_text(f"{data / 'im1.png'}\n")
    files = image_files([str(data / "*.png"), tmp_path / "list.txt", data / "im0.png"])
    assert [p.name for p in files] == ["im0.png", "im1.png"]


def _strict(text: str):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_evaluation_json_is_strict(tmp_path, capsys):
    from retinanet.runtime.outputs import strict_json

    text = strict_json({"AP": float("nan"), "per_class": {"a": float("inf")}, "n": torch.tensor(3)})
    assert _strict(text) == {"AP": None, "per_class": {"a": None}, "n": 3}
    run = tmp_path / "run"
    assert main(["train", *tiny_run(run, "train.max_iters=1")]) == 0  # 64 px images: APl is undefined (NaN)
    metrics = _strict((run / "eval" / "metrics.json").read_text())
    assert metrics["APl"] is None and math.isfinite(metrics["AP"])
    for line in (run / "log.jsonl").read_text().splitlines():
        _strict(line)
