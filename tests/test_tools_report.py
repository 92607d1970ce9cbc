"""The evaluation report: written by `retinanet eval --report`, by `retinanet report` for detections made anywhere,
and by a training run's last evaluation; one self-contained page; and, in a real browser (headless Chromium), a page
that renders its chart and gallery without console errors and whose threshold control changes the counts shown."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run
from PIL import Image

from retinanet.cli import main
from retinanet.evaluation.errors import analyze_errors
from retinanet.evaluation.report import ReportImage, best_f1_thresholds, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _self_contained(page: Path) -> None:
    text = page.read_text()
    assert "<script src" not in text and "<link " not in text and "https://" not in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # a namespace, not a download


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with a validation set: its own last evaluation writes the report."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", *tiny_run(run, "train.max_iters=2", "model.score_thresh=0.0")]) == 0
    return run


def test_the_runs_last_evaluation_and_eval_report_write_the_page(trained, tmp_path, capsys):
    page = trained / "eval" / "report" / "index.html"
    assert page.exists() and (trained / "eval" / "report" / "errors.json").exists()
    _self_contained(page)
    errors = json.loads((trained / "eval" / "report" / "errors.json").read_text())
    assert set(errors["counts"]) == {"cls", "loc", "both", "dupe", "bkg", "missed"}
    assert set(errors["dap"]["bkg"]) == {"50", "avg"} and "circle" in errors["per_class"]
    assert list((trained / "eval" / "report" / "images").iterdir())
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(trained / "last.pt"), "--output", str(out), "--report"]) == 0
    assert (out / "report" / "index.html").exists() and "report:" in capsys.readouterr().out


def test_report_of_detections_made_anywhere(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "images" / "a.png"
    )
    ann = {
        "images": [{"id": 7, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [4, 4, 20, 20], "iscrowd": 0, "area": 400},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [40, 10, 16, 16], "iscrowd": 0, "area": 256},
        ],
        "categories": [{"id": 3, "name": "tree"}],
    }
    results = [
        {"image_id": 7, "category_id": 3, "bbox": [4, 4, 20, 20], "score": 0.9},
        {"image_id": 7, "category_id": 3, "bbox": [4, 30, 10, 10], "score": 0.8},
    ]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    out = tmp_path / "report"
    annotations = ["--annotations", str(tmp_path / "ann.json")]
    images = ["--images", str(tmp_path / "images")]
    assert main(["report", "--detections", str(tmp_path / "dt.json"), *annotations, *images, "--output", str(out)]) == 0
    errors = json.loads((out / "errors.json").read_text())
    assert errors["counts"]["bkg"] == 1 and errors["counts"]["missed"] == 1
    assert errors["best_f1"]["tree"]["threshold"] == pytest.approx(0.9)  # the background detection only lowers F1
    _self_contained(out / "index.html")
    for bad, said in (
        ({"category_id": 99, "bbox": [0, 0, 1, 1]}, "category ids [99]"),
        ({"category_id": 3, "bbox": [0, 0, 1]}, "entry 0: bbox [0, 0, 1]; expected [x, y, w, h]"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 7, "score": 1, **bad}]))
        assert main(["report", "--detections", str(tmp_path / "bad.json"), *annotations, "--output", str(out)]) == 2
        assert said in capsys.readouterr().err


def test_best_f1_threshold_by_hand():
    scores, tp, labels = np.array([0.9, 0.8, 0.7, 0.2]), np.array([True, False, True, True]), np.zeros(4, int)
    best = best_f1_thresholds(scores, tp, labels, {0: 3})[0]
    assert best["threshold"] == pytest.approx(0.2) and best["f1"] == pytest.approx(2 * 0.75 * 1 / 1.75)


def _large_set(images: int, per_image: int, size=(120, 160)):
    g = torch.Generator().manual_seed(0)
    gts, dets, shown = [], [], []
    for i in range(images):
        xy = torch.rand(per_image // 2, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + 20], 1)
        gts.append({"boxes": boxes, "labels": torch.randint(0, 3, (len(boxes),), generator=g)})
        moved = torch.cat(
            [
                boxes + torch.randn(len(boxes), 4, generator=g) * 4,
                torch.rand(per_image - len(boxes), 2, generator=g).repeat(1, 2) * 100 + torch.tensor([0, 0, 15, 15]),
            ]
        )
        dets.append(
            {
                "boxes": moved,
                "scores": torch.rand(per_image, generator=g),
                "labels": torch.randint(0, 3, (per_image,), generator=g),
            }
        )
        shown.append(ReportImage(f"im{i}", size, None, np.full((*size, 3), 200, np.uint8)))
    return gts, dets, shown


def test_a_large_evaluation_stays_a_page_of_reasonable_size(tmp_path):
    gts, dets, shown = _large_set(images=500, per_image=40)  # 20,000 detections
    page = write_report(tmp_path, shown, gts, dets, ["a", "b", "c"], analyze_errors(gts, dets), gallery=100)
    assert page.stat().st_size < 3e6 and len(list((tmp_path / "images").iterdir())) == 100
    data = page.read_text().split('<script id="data" type="application/json">')[1].split("</script>")[0]
    assert len(json.loads(data)["scores"]) == 20_000


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs Debian's chromium)")
def test_the_page_in_a_real_browser(trained, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    page_file = trained / "eval" / "report" / "index.html"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(page_file.as_uri())
        page.wait_for_selector("#gallery .card svg")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        for selector in ("#error-chart", "#gallery .card"):  # rendered where they stand: not blank
            box = page.locator(selector).first.bounding_box()
            assert box and box["width"] > 50 and box["height"] > 50, selector
            crop = page.locator(selector).first.screenshot()
            pixels = np.asarray(Image.open(io.BytesIO(crop)).convert("L"), dtype=float)
            assert pixels.std() > 5, f"{selector} is blank"
        before = page.inner_text("#counts")
        page.eval_on_selector("#threshold", "e => { e.value = 0.0; e.dispatchEvent(new Event('input')); }")
        after = page.inner_text("#counts")
        page.eval_on_selector("#threshold", "e => { e.value = 0.99; e.dispatchEvent(new Event('input')); }")
        high = page.inner_text("#counts")
        page.locator("#gallery .card svg").first.click()  # an image opens over the page, and zooms
        assert page.locator("#zoom").is_visible()
        width = page.locator("#zoom-view svg").bounding_box()["width"]
        page.click("#zoom-in")
        assert page.locator("#zoom-view svg").bounding_box()["width"] > 1.5 * width
        page.keyboard.press("Escape")
        assert not page.locator("#zoom").is_visible()
        browser.close()
    assert not problems, problems
    assert "TP" in after and before != after != high  # moving the threshold changes the counts


def test_the_report_says_what_to_try_for_each_costly_error_type(tmp_path):
    from retinanet.evaluation.report import what_to_try

    gt = [
        {
            "boxes": torch.tensor([[0.0, 0, 20, 20], [40, 40, 60, 60], [70, 0, 90, 20]]),
            "labels": torch.zeros(3, dtype=torch.long),
        }
    ]
    # one box fits, one sits on its object but badly (IoU ~ .3: loc), one object is missed, one detection is background
    dets = [
        {
            "boxes": torch.tensor([[0.0, 0, 20, 20], [44, 44, 70, 70], [0, 70, 10, 80]]),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.zeros(3, dtype=torch.long),
        }
    ]
    errors = analyze_errors(gt, dets)
    advice = {k: text for k, _, text in what_to_try(errors)}
    assert "model.cls_loss: quality_focal" in advice["loc"] and "model.assigner: atss" in advice["loc"]
    assert (
        "anchors --fit" in advice["missed"]
        and "model.score_thresh" in advice["missed"]
        and "--tile" in advice["missed"]
    )
    assert set(advice) <= {"loc", "missed", "bkg"} and [k for k, _, _ in what_to_try(errors)][0] == max(
        advice, key=lambda k: errors.dap[k]["50"]
    )  # costliest first
    page = write_report(
        tmp_path,
        [ReportImage("a.png", (100, 100), None, np.zeros((100, 100, 3), np.uint8))],
        gt,
        dets,
        ["tree"],
        errors,
    )
    text = page.read_text()
    assert 'id="what-to-try"' in text and "model.box_loss: giou" in text
    assert set(json.loads((tmp_path / "errors.json").read_text())["what_to_try"]) == set(advice)


def test_the_report_gives_every_ap_in_one_unit_and_no_nan(tmp_path):
    import re

    gt = [{"boxes": torch.tensor([[0.0, 0, 20, 20], [40, 40, 60, 60]]), "labels": torch.zeros(2, dtype=torch.long)}]
    dets = [
        {
            "boxes": torch.tensor([[0.0, 0, 20, 20], [44, 44, 70, 70]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.zeros(2, dtype=torch.long),
        }
    ]
    errors = analyze_errors(gt, dets)
    page = write_report(
        tmp_path,
        [ReportImage("a.png", (100, 100), None, np.zeros((100, 100, 3), np.uint8))],
        gt,
        dets,
        ["tree", "car"],  # car: no objects, an AP not defined
        errors,
    )
    html_text = page.read_text().split('<script id="data"')[0]
    assert not re.search(r"\bnan\b", html_text, re.IGNORECASE)
    assert "a fraction from 0 to 1" in html_text
    # a gallery image opens over the page at full size and larger, its boxes' lines kept thin
    page_text = page.read_text()
    assert 'id="zoom"' in page_text and "openZoom(c)" in page_text and "non-scaling-stroke" in page_text
    shown = [x for x in re.findall(r">([-\d.]+)(?: AP50)?<", html_text) if x not in ("-",)]
    assert shown and all(0.0 <= float(x) <= 1.0 for x in shown), shown  # no 83.54 beside 0.835
