"""The public API stays: every name the README uses imports, and the public names are at the top of the package."""

import importlib
import re
from pathlib import Path

import retinanet

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PUBLIC = [
    "build_model",
    "load",
    "losses",
    "from_torchvision",
    "load_torchvision_coco",
    "ModelConfig",
    "model_config",
    "Predictor",
    "RetinaNet",
    "Detections",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
    "sigmoid_focal_loss_from_labels",
    "binary_cross_entropy",
    "smooth_l1_loss",
    "l1_loss",
    "giou_loss",
    "hard_negative_mining",
]


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
