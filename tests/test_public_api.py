"""The public API stays: every name the README uses imports, and the import paths of 0.1 keep working for one
release with a DeprecationWarning that names the new place."""

import importlib
import re
import sys
from pathlib import Path

import pytest

import retinanet
from retinanet.moved import MOVED

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PUBLIC = ["build_model", "load", "losses", "from_torchvision", "load_torchvision_coco", "ModelConfig", "model_config",
          "Predictor", "RetinaNet", "Detections", "sigmoid_focal_loss", "sigmoid_focal_loss_star",
          "sigmoid_focal_loss_from_labels", "binary_cross_entropy", "smooth_l1_loss", "l1_loss", "giou_loss",
          "hard_negative_mining"]  # fmt: skip


def _readme_names() -> set[str]:
    """Dotted names the README's Python shows: retinanet.X.Y and the names of `from retinanet.X import a, b`."""
    names = set(re.findall(r"\bretinanet(?:\.[A-Za-z_]\w*)+", README))
    for module, imported in re.findall(r"from (retinanet(?:\.\w+)*) import ([\w, ]+)", README):
        for name in (n.strip() for n in imported.split(",") if n.strip()):
            names.add(f"{module}.{name}")
            # `from retinanet import losses` then `losses.sigmoid_focal_loss(...)`
            names |= {f"{module}.{name}.{attr}" for attr in re.findall(rf"\b{name}\.([A-Za-z_]\w*)\(", README)}
    return {n for n in names if not n.endswith((".py", ".yaml", ".json"))}


def _resolve(dotted: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_name_the_readme_uses_exists():
    names = _readme_names()
    assert {"retinanet.build_model", "retinanet.load", "retinanet.losses.sigmoid_focal_loss"} <= names
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, "\n".join(missing)


def test_the_public_names_are_at_the_top():
    for name in PUBLIC:
        assert getattr(retinanet, name) is not None, name
    assert set(PUBLIC) <= set(retinanet.__all__)
    from retinanet import losses

    assert losses.sigmoid_focal_loss is retinanet.sigmoid_focal_loss


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_paths_work_with_a_deprecation_warning(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{re.escape(old)} has moved to {re.escape(MOVED[old][0])}"):
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old][0])
    public = [n for n in getattr(new, "__all__", []) if hasattr(new, n)]
    assert public and all(getattr(module, n) is getattr(new, n) for n in public)


def test_old_names_that_were_split_come_from_their_new_modules(monkeypatch):
    for old in ("retinanet.engine", "retinanet.anchor_tools", "retinanet.winograd", "retinanet.export"):
        monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning):
        from retinanet.anchor_tools import anchor_generator, coverage, fit_anchors, write_report
        from retinanet.engine import load_checkpoint, load_model, lr_factor, save_checkpoint, train
        from retinanet.export import OnnxPredictor, export_onnx, verify_export
        from retinanet.winograd import Conv2d, winograd_conv3x3
    from retinanet.deploy import OnnxPredictor as new_predictor
    from retinanet.model import load_model as new_load_model
    from retinanet.ops.anchors import anchor_generator as new_generator
    from retinanet.train import train as new_train

    assert load_model is new_load_model and train is new_train and OnnxPredictor is new_predictor
    assert anchor_generator is new_generator
    assert all(callable(f) for f in (coverage, fit_anchors, write_report, load_checkpoint, lr_factor,
                                     save_checkpoint, export_onnx, verify_export, Conv2d, winograd_conv3x3))
