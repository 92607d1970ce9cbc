"""ONNX export: the graph's post-processing equals ours in PyTorch; the exported file, run by ONNX Runtime (and
OpenVINO where installed), gives PyTorch's detections at two sizes, batch 1 and 2, and for images with none;
`retinanet export` and `retinanet detect --onnx` end to end."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import build_model
from retinanet.cli import main
from retinanet.deploy.engines import OnnxPredictor, pad_batch
from retinanet.deploy.graph import InferenceGraph, export_onnx, read_metadata, require
from retinanet.deploy.parity import compare_detections, verify_export
from retinanet.inference.predictor import Predictor
from retinanet.model.checkpoint import save_checkpoint
from retinanet.ops.postprocess import Detections

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")


def _tiny(spread: bool = True, **overrides):
    """The small preset; with `spread`, class weights that give scores across (0, 1) (an untrained head scores
    everything at the prior 0.01, under the 0.05 threshold: no detections)."""
    torch.manual_seed(0)
    model = build_model("retinanet_tiny", num_classes=3, min_size=128, max_size=160, **overrides).eval()
    if spread:
        torch.nn.init.normal_(model.head.cls_logits.weight, std=0.03)
        torch.nn.init.zeros_(model.head.cls_logits.bias)
    return model


def _images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, h, w, generator=g) * 255).to(torch.uint8) for h, w in sizes]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The spread tiny model and its export with dynamic batch and size (one export for the module: tracing with
    symbolic sizes takes most of a minute)."""
    model = _tiny()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, path


def _padded(images):
    batch, sizes = pad_batch(images, 32)
    return torch.from_numpy(batch), torch.from_numpy(sizes)


@pytest.mark.parametrize("sizes", [[(128, 160)], [(128, 160), (96, 128)], [(64, 64)]], ids=["one", "two", "small"])
def test_the_graph_in_pytorch_gives_the_models_detections(sizes):
    """The traced graph's post-processing (top-k without branches, NMS as one operator, fixed-size outputs) is
    the model's own: checked in PyTorch, before any exporter or engine; 64 px has fewer anchors than k at P4+."""
    model = _tiny()
    images = [im.float() / 255 for im in _images(*sizes)]
    reference = model.predict(images, resize=False)
    with torch.no_grad():
        boxes, scores, labels, counts = InferenceGraph(model)(*_padded(images))
    found = [Detections(boxes[b, :n], scores[b, :n], labels[b, :n]) for b, n in enumerate(counts.tolist())]
    assert boxes.shape[1] == model.config.detections_per_image
    assert (labels[0, counts[0] :] == -1).all() and (scores[0, counts[0] :] == 0).all()
    agreement = compare_detections(reference, found, box_tol=1e-3, score_tol=1e-5)
    assert agreement.identical and agreement.matched == sum(len(d.scores) for d in reference) > 0


@pytest.mark.slow
def test_exported_file_is_valid_and_carries_the_model_config(exported):
    model, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["images", "image_sizes"]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels", "num_detections"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[2], str) and isinstance(dims[3], str)  # batch, H, W dynamic
    assert any(n.op_type == "NonMaxSuppression" for n in proto.graph.node)
    config, categories, size = read_metadata(path)
    assert config == model.config and size is None and [c["name"] for c in categories] == ["0", "1", "2"]


@pytest.mark.slow
def test_onnxruntime_gives_pytorchs_detections_at_two_sizes_batch_1_and_2(exported):
    model, path = exported
    report = verify_export(model, path)
    assert [what.split(" (")[0] for what, _ in report.checks] == ["onnxruntime, batch 1"] * 2 + ["onnxruntime, batch 2"]
    assert report.ok and all(a.identical for _, a in report.checks), report.describe()
    assert report.compared == 400  # 100 detections per image: every check compared real detections
    for _, agreement in report.checks:
        assert agreement.max_box_diff <= 0.5 and agreement.max_score_diff <= 1e-3


@pytest.mark.slow
def test_onnx_predictor_has_the_predictor_interface(exported):
    model, path = exported
    images = _images((300, 500), (40, 90), (128, 128), seed=1)  # resized up and down; 40 x 90: one cell at P7
    eager = Predictor(model, score_thresh=0.2, batch_size=2).predict(images)
    engine = OnnxPredictor(path, score_thresh=0.2, batch_size=2).predict(images)
    assert [p.image_size for p in engine] == [(300, 500), (40, 90), (128, 128)]
    agreement = compare_detections(eager, engine, score_thresh=0.2)
    assert agreement.identical and agreement.matched > 0, agreement.describe()
    assert engine[0].names == [str(k) for k in engine[0].labels.tolist()]
    tiled_eager = Predictor(model, score_thresh=0.2, tile=200).predict(images[0])
    tiled_engine = OnnxPredictor(path, score_thresh=0.2, tile=200).predict(images[0])
    tiled = compare_detections([tiled_eager], [tiled_engine])
    assert tiled.identical and tiled.matched > 0, tiled.describe()


@pytest.mark.slow
def test_openvino_gives_pytorchs_detections(exported):
    pytest.importorskip("openvino")
    model, path = exported
    report = verify_export(model, path, engine="openvino")
    assert report.ok and report.compared == 400, report.describe()


def test_compare_detections_counts_what_differs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [5.0, 5.0, 9.0, 9.0]])
    ref = Detections(boxes, torch.tensor([0.9, 0.5, 0.0505]), torch.tensor([0, 1, 1]))
    assert compare_detections([ref], [ref]).identical
    moved = Detections(boxes + torch.tensor([0.6, 0.0, 0.0, 0.0]), ref.scores, ref.labels)
    a = compare_detections([ref], [moved])
    assert (a.matched, a.missing, a.extra) == (0, 3, 3) and not a.ok
    relabelled = Detections(boxes, ref.scores, torch.tensor([0, 2, 1]))
    assert compare_detections([ref], [relabelled]).missing == 1
    # a detection just above the score threshold that the other lacks: the last bit decides, so it is borderline
    dropped = Detections(boxes[:2], ref.scores[:2], ref.labels[:2])
    a = compare_detections([ref], [dropped], score_thresh=0.05)
    assert (a.missing, a.borderline) == (1, 1) and a.ok and not a.identical


def test_missing_engine_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ValueError, match=r"openvino is not installed: pip install openvino .*retinanet\[openvino\]"):
        require("openvino")


def test_fixed_size_inputs_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="image 1: resized to \\(128, 200\\).*fixed input size \\(128, 160\\)"):
        pad_batch([torch.zeros(3, 100, 100), torch.zeros(3, 128, 200)], 32, (128, 160))


@pytest.mark.slow
def test_export_and_detect_from_the_command_line(tmp_path, capsys):
    """`retinanet export` with a fixed size of an untrained checkpoint (no detections anywhere: the parity check
    says it compared none), then `retinanet detect --onnx` lists every image with its (empty) detections."""
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", _tiny(spread=False))
    out = tmp_path / "tiny.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--image-size", "160", "160"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime, batch 2" in printed and "found nothing" in printed and "checker passed" in printed
    assert read_metadata(out)[2] == (160, 160)
    images = tmp_path / "images"
    images.mkdir()
    for i, im in enumerate(_images((128, 160), (160, 128))):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(images / f"im{i}.png")
    detect = ["detect", str(images), "--onnx", str(out), "--output", str(tmp_path / "det"), "--workers", "0"]
    assert main([*detect, "--score-thresh", "0.0"]) == 2
    assert "keeps scores above its score_thresh 0.05" in capsys.readouterr().err  # below what the graph keeps
    assert main([*detect, "--score-thresh", "0.05"]) == 0
    records = json.loads((tmp_path / "det" / "detections.json").read_text())
    assert [r["file"].rsplit("/", 1)[1] for r in records] == ["im0.png", "im1.png"]
    assert all(r["detections"] == [] for r in records)
    assert json.loads((tmp_path / "det" / "results.json").read_text()) == []
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--opset", "13"]) == 2
    assert "opset 13" in capsys.readouterr().err


def test_pad_batch_pads_to_multiples_with_zeros():
    batch, sizes = pad_batch([torch.ones(3, 40, 70), torch.ones(3, 65, 30)], 32)
    assert batch.shape == (2, 3, 96, 96) and sizes.tolist() == [[40, 70], [65, 30]]
    assert batch[0, :, :40, :70].min() == 1 and batch[0, :, 40:].max() == 0 and batch[0, :, :, 70:].max() == 0
    assert np.asarray(batch).dtype == np.float32


@pytest.mark.slow
def test_int8_quantizes_the_convolutions_and_keeps_the_detections(exported, tmp_path):
    """The INT8 model: QDQ around the convolutions only (decoding and NMS untouched), calibrated on images like the
    model's; its detections stay close to the float32 export's (the same objects, boxes within a few pixels)."""
    pytest.importorskip("onnxruntime.quantization")
    from retinanet.deploy.parity import compare_engines
    from retinanet.deploy.quantize import int8_path, quantize_int8

    model, path = exported
    images = _images(*[(128, 160)] * 6, seed=3)
    quantized = quantize_int8(path, int8_path(tmp_path / "tiny.onnx"), model.config, images)
    assert quantized.name == "tiny.int8.onnx"
    proto = onnx.load(str(quantized))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= sum(op == "Conv" for op in ops) > 0
    assert "NonMaxSuppression" in ops and read_metadata(quantized)[0] == model.config  # metadata kept
    agreement = compare_engines(path, quantized, _images((128, 160), (96, 128), seed=5))
    assert agreement.matched > 0.5 * (agreement.matched + agreement.missing), agreement.describe()


@pytest.mark.slow
def test_export_int8_from_the_command_line(exported, tmp_path, capsys):
    model, _ = exported
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", model)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_images((128, 160), (128, 160), seed=9)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "val.csv").write_text("0.png,10,10,60,60,a\n1.png,20,20,90,70,a\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{format: csv, train_annotations: {folder / 'val.csv'}, val_annotations: {folder / 'val.csv'}}}\n"
    )
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--int8"]) == 2
    assert "--calibration" in capsys.readouterr().err
    args = ["export", "--checkpoint", str(checkpoint), "--output", str(out), "--int8", "--calibration", str(config)]
    assert main([*args, "--image-size", "160", "160"]) == 0  # a fixed size: half the tracing
    assert "INT8 model" in capsys.readouterr().out and (tmp_path / "m.int8.onnx").exists()
    assert (
        main(
            [
                "detect",
                str(folder / "0.png"),
                "--onnx",
                str(tmp_path / "m.int8.onnx"),
                "--output",
                str(tmp_path / "d"),
                "--workers",
                "0",
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_an_export_that_cannot_be_written_keeps_the_earlier_file(exported, tmp_path, monkeypatch):
    import errno

    from retinanet.runtime import outputs

    model, path = exported
    earlier = tmp_path / "m.onnx"
    earlier.write_bytes(path.read_bytes())

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", no_space)
    with pytest.raises(outputs.WriteError, match=r"cannot write .*m\.onnx \(No space left on device\)"):
        export_onnx(model, earlier, image_size=(64, 64))
    assert earlier.read_bytes() == path.read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
