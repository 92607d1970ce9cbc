"""Validation across images (retinanet.evaluation.validation, data.extra_val, train.best_weights): every set evaluated
and reported on its own, with AP, AP50, AP75 and the AP each error type costs; best.pt chosen on their weighted mean."""

import json

import pytest
import torch
from conftest import tiny_settings

from retinanet.config import load_run_config
from retinanet.data import SyntheticShapes, write_coco
from retinanet.evaluation.errors import ERROR_TYPES
from retinanet.evaluation.validation import metric_name, selection_score, validation_lines
from retinanet.train.run import run_train


def test_metric_names_and_selection_score():
    assert metric_name("val", "AP") == "AP" and metric_name("other_site", "AP") == "other_site/AP"
    metrics = {"AP": 0.4, "other_site/AP": 0.1, "AP50": 0.9}
    assert selection_score(metrics, ["val", "other_site"], "AP") == pytest.approx(0.25)
    assert selection_score(metrics, ["val", "other_site"], "AP", {"other_site": 3, "val": 1}) == pytest.approx(0.175)
    assert selection_score({"AP": 0.4, "other_site/AP": float("nan")}, ["val", "other_site"], "AP") == 0.2
    with pytest.raises(ValueError, match=r"best_weights names \['strip'\]"):
        selection_score(metrics, ["val", "other_site"], "AP", {"strip": 1.0})
    line, other = validation_lines(
        {**metrics, "dAP50_loc": 0.2, "other_site/dAP50_missed": 0.3}, ["val", "other_site"], 7
    )
    assert line.startswith("eval at iteration 7, val: AP 0.400") and "loc 0.200" in line
    assert other.startswith("eval at iteration 7, other_site: AP 0.100") and "missed 0.300" in other


def _coco_split(folder, split, n, seed):
    images, annotations = write_coco(SyntheticShapes(split, num_images=n, image_size=(64, 64), seed=seed), folder)
    return str(images), str(annotations)


def test_a_run_evaluates_every_validation_set_and_keeps_best_on_their_weighed_score(tmp_path, capsys):
    train_images, train_json = _coco_split(tmp_path / "train", "train", 8, 0)
    val_images, val_json = _coco_split(tmp_path / "strip", "val", 3, 1)
    site_images, site_json = _coco_split(tmp_path / "site", "val", 2, 2)
    out = tmp_path / "run"
    extra = json.dumps({"site": {"val_images": site_images, "val_annotations": site_json}})
    cfg = load_run_config(
        None,
        [
            *tiny_settings(),
            "data.format=coco",
            f"data.train_images={train_images}",
            f"data.train_annotations={train_json}",
            f"data.val_images={val_images}",
            f"data.val_annotations={val_json}",
            f"data.extra_val={extra}",
            "train.eval_every=2",
            "train.max_iters=4",
            "train.best_weights={val: 1, site: 3}",
            f"train.output_dir={out}",
        ],
    )
    run_train(cfg)
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval/AP" in r]
    assert [r["iter"] for r in evals] == [2, 4]
    for r in evals:
        for name in ("", "site/"):
            assert {f"eval/{name}{k}" for k in ("AP", "AP50", "AP75", "AR100")} <= set(r)
            assert {f"eval/{name}dAP50_{k}" for k in ERROR_TYPES} <= set(r)
        assert r["eval/selection"] == pytest.approx((r["eval/AP"] + 3 * (r["eval/site/AP"])) / 4, abs=1e-9)
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["extra"]["best"]
    assert best["metric"] == "AP weighed over the validation sets"
    assert best["value"] == max(r["eval/selection"] for r in evals)
    # each set's own files and, at the last evaluation, its own report
    for folder in (out / "eval", out / "eval" / "site"):
        assert (folder / "metrics.json").is_file() and (folder / "report" / "index.html").is_file()
    notes = (out / "train.log").read_text()
    assert "eval at iteration 4, val: AP" in notes and "eval at iteration 4, site: AP" in notes
    assert "validation images 3 (val), 2 (site)" in capsys.readouterr().out


def test_extra_validation_sets_are_checked_before_the_run(tmp_path):
    with pytest.raises(ValueError, match=r"extra_val: name 'val' must be"):
        load_run_config(None, ["data.extra_val={val: {val_annotations: x.json}}"])
    with pytest.raises(ValueError, match=r"extra_val.site = .* must be a mapping of some of"):
        load_run_config(None, ["data.extra_val={site: {train_images: x}}"])
    with pytest.raises(ValueError, match="best_weights must map"):
        load_run_config(None, ["train.best_weights={val: -1}"])
