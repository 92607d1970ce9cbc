"""Batch inference over files: inputs from folders, globs and list files; one entry per image in every output,
images without detections included; bad files stop the run or are skipped by name; batched equals one by one."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from retinanet import build_model
from retinanet.cli import main
from retinanet.data import CsvDetection
from retinanet.inference.files import image_files, run_inference
from retinanet.inference.predictor import Predictor
from retinanet.model.checkpoint import save_checkpoint


def _tiny():
    torch.manual_seed(0)
    model = build_model(
        "retinanet_tiny", num_classes=3, min_size=96, max_size=96, class_names=("a", "b", "c"), category_ids=(4, 5, 6)
    ).eval()
    torch.nn.init.normal_(model.head.cls_logits.weight, std=0.03)  # scores across (0, 1): detections to count
    torch.nn.init.zeros_(model.head.cls_logits.bias)
    return model


def _save(folder: Path, name: str, size=(80, 96), seed=0) -> Path:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[0], size[1], 3, generator=g) * 255).to(torch.uint8).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / name)
    return folder / name


def test_inputs_from_folders_globs_and_list_files(tmp_path):
    a, b = _save(tmp_path / "x", "b.png"), _save(tmp_path / "x", "a.jpg")
    c = _save(tmp_path / "y" / "deep", "c.png")
    (tmp_path / "x" / "notes.md").write_text("not an image")
    listed = tmp_path / "y" / "todo.txt"
    listed.write_text("# images to do\ndeep/c.png\n\n" + str(a) + "\n")
    assert image_files([tmp_path / "x"]) == [b, a]  # a folder: its images by name
    assert image_files([str(tmp_path / "**" / "*.png")]) == sorted([a, c])
    assert image_files([listed, b]) == [c, a, b]  # relative lines against the list file's folder; order kept
    with pytest.raises(ValueError, match="input not found: .*missing.png"):
        image_files([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="no files match"):
        image_files([str(tmp_path / "*.tif")])
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="empty.txt: empty list file"):
        image_files([tmp_path / "empty.txt"])


def _threshold_between(predictor: Predictor, full: Path, empty: Path) -> float:
    """A score threshold that keeps some detections of `full` and none of `empty`."""
    best = [float(predictor.predict(p).scores.max()) for p in (full, empty)]
    assert best[0] != best[1]
    if best[0] < best[1]:
        raise AssertionError("pick images the other way round")
    return (best[0] + best[1]) / 2


@pytest.mark.parametrize("workers", [0, 2])
def test_every_image_is_listed_and_bad_files_are_skipped_by_name(tmp_path, workers, capsys):
    model = _tiny()
    folder = tmp_path / "images"
    files = [_save(folder, f"im{i}.png", size=(80 + 8 * i, 96), seed=i) for i in range(4)]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ordered = image_files([folder])
    thresh = _threshold_between(Predictor(model), files[0], files[3])  # im3 will have no detections
    predictor = Predictor(model, score_thresh=thresh)
    with pytest.raises(ValueError, match="broken.png"):
        run_inference(predictor, ordered, tmp_path / "out", batch_size=2, workers=workers, progress=False)
    capsys.readouterr()
    result = run_inference(
        predictor,
        ordered,
        tmp_path / "out",
        batch_size=2,
        workers=workers,
        skip_bad=True,
        csv_file=True,
        progress=False,
    )
    assert re.search(r"skipped an image: .*broken\.png", capsys.readouterr().err)
    assert [Path(p).name for p, _ in result.skipped] == ["broken.png"]
    listed = json.loads((tmp_path / "out" / "detections.json").read_text())
    left_out = [r for r in listed if "skipped" in r]  # the skipped file is listed too, with why and no detections
    assert [(Path(r["file"]).name, r["detections"]) for r in left_out] == [("broken.png", [])]
    assert json.loads((tmp_path / "out" / "skipped.json").read_text())[0]["file"].endswith("broken.png")
    records = [r for r in listed if "skipped" not in r]
    assert [Path(r["file"]).name for r in records] == [f"im{i}.png" for i in range(4)]
    assert [r["image_id"] for r in records] == [1, 2, 3, 4] and records[3]["detections"] == []
    assert records[0]["detections"] and (records[1]["height"], records[1]["width"]) == (88, 96)
    assert {d["category_id"] for r in records for d in r["detections"]} <= {4, 5, 6}
    coco = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(coco) == sum(len(r["detections"]) for r in records) and {c["image_id"] for c in coco} <= {1, 2, 3}
    first = records[0]["detections"][0]
    x1, y1, x2, y2 = first["box"]
    assert (
        coco[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
        and coco[0]["category_id"] == first["category_id"]
    )
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f"im{i}.png" for i in range(4)]
    rows = list(csv.reader((tmp_path / "out" / "detections.csv").open()))
    assert [r for r in rows if r[0].endswith("im3.png")] == [[str(files[3]), "", "", "", "", ""]]
    assert len(rows) == sum(max(len(r["detections"]), 1) for r in records)
    # the CSV reads back as training data in the keras-retinanet layout (pseudo-labels), every image included
    back = CsvDetection(
        tmp_path / "out" / "detections.csv",
        categories=[{"id": 4, "name": "a"}, {"id": 5, "name": "b"}, {"id": 6, "name": "c"}],
    )
    assert len(back) == 4


def _assert_same_records(a: list[dict], b: list[dict]) -> None:
    """The same images and detections, up to float32 rounding: a batch of 1 and one of 3 may run other
    convolution kernels (oneDNN chooses by shape and thread count), whose last bits differ, and a last bit can
    move a rounded figure of detections.json."""
    assert [{k: v for k, v in r.items() if k != "detections"} for r in a] == [
        {k: v for k, v in r.items() if k != "detections"} for r in b
    ]
    for ra, rb in zip(a, b):
        assert len(ra["detections"]) == len(rb["detections"]), ra["file"]
        for da, db in zip(ra["detections"], rb["detections"]):
            assert (da["label"], da["name"], da["category_id"]) == (db["label"], db["name"], db["category_id"])
            assert da["box"] == pytest.approx(db["box"], abs=0.011) and da["score"] == pytest.approx(
                db["score"], abs=2e-4
            )


def test_batched_is_one_by_one_and_tiles_work_from_files(tmp_path):
    model = _tiny()
    files = [_save(tmp_path / "in", f"im{i}.png", seed=i) for i in range(3)]  # one size: no padding differences
    predictor = Predictor(model, score_thresh=0.3)
    one = run_inference(predictor, files, tmp_path / "one", batch_size=1, draw=False, progress=False).records
    three = run_inference(predictor, files, tmp_path / "three", batch_size=3, draw=False, progress=False).records
    _assert_same_records(one, three)
    assert sum(len(r["detections"]) for r in one) > 0
    assert not list((tmp_path / "one").glob("*.png"))
    big = _save(tmp_path / "in", "big.png", size=(200, 300), seed=7)
    tiled = Predictor(model, score_thresh=0.3, tile=96, overlap=0.25)
    records = run_inference(tiled, [big], tmp_path / "tiled", batch_size=4, progress=False).records
    assert records[0]["detections"] == tiled.predict(big).to_dicts()
    assert (tmp_path / "tiled" / "big.png").exists()


def test_detect_command_with_batches_workers_csv_and_tiles(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", _tiny())
    for i in range(3):
        _save(tmp_path / "in", f"im{i}.png", seed=i)
    (tmp_path / "list.txt").write_text("in/im2.png\nin/im0.png\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "detect",
                str(tmp_path / "list.txt"),
                str(tmp_path / "in" / "im1.png"),
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(out),
                "--batch-size",
                "2",
                "--workers",
                "1",
                "--csv",
                "--tile",
                "64",
                "--overlap",
                "0.25",
                "--no-draw",
            ]
        )
        == 0
    )
    records = json.loads((out / "detections.json").read_text())
    assert [Path(r["file"]).name for r in records] == ["im2.png", "im0.png", "im1.png"]
    assert (out / "detections.csv").exists() and (out / "results.json").exists() and not list(out.glob("*.png"))
    assert "3 images" in capsys.readouterr().out
    assert main(["detect", str(tmp_path / "in"), "--checkpoint", str(checkpoint), "--tile", "0"]) == 2
    assert "tile must be at least 1 px" in capsys.readouterr().err


def test_outputs_are_streamed_as_json_writes_them_and_a_failed_run_leaves_the_earlier_files_whole(tmp_path):
    folder = tmp_path / "images"
    files = [_save(folder, f"im{i}.png", seed=i) for i in range(3)]
    out = tmp_path / "out"
    predictor = Predictor(_tiny(), score_thresh=0.2)
    result = run_inference(
        predictor, files, out, batch_size=1, csv_file=True, yolo_txt=True, draw=False, progress=False
    )
    listed, coco = (out / "detections.json").read_text(), (out / "results.json").read_text()
    assert listed == json.dumps(json.loads(listed), indent=1) and coco == json.dumps(json.loads(coco))
    assert result.images == 3 and result.detections == sum(len(r["detections"]) for r in result.records) > 0
    assert len(json.loads(coco)) == result.detections
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len([name for name in before if name.startswith("labels")]) == 3
    broken = folder / "zz_broken.png"  # the last file: the three before it are streamed when the run fails
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="zz_broken.png"):
        other = Predictor(_tiny(), score_thresh=0.9)  # other detections: nothing it writes may replace the earlier
        run_inference(other, [*files, broken], out, 1, csv_file=True, draw=False, progress=False, yolo_txt=True)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # no tmp left
    assert sorted(p.name for p in out.iterdir()) == ["detections.csv", "detections.json", "labels", "results.json"]
