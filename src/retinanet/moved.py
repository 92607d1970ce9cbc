"""Import paths of before the layered layout (0.1), kept for one release with a DeprecationWarning.

`import retinanet.detector` (or `from retinanet.engine import load_model`) still works: the old module name is an
alias of the module its public names now live in, and the first import says where that is. A module the old one was
split into is named by `MOVED`; names that moved within a split come from the first module of its list that has
them. Installed by `retinanet/__init__.py`; removed in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__all__ = ["MOVED", "install"]

# old module -> the modules its public names live in now (the first is named in the warning)
MOVED: dict[str, tuple[str, ...]] = {
    "retinanet.train_config": ("retinanet.config",),
    "retinanet.runconfig": ("retinanet.config",),
    "retinanet.boxes": ("retinanet.ops.boxes",),
    "retinanet.resize": ("retinanet.ops.resize",),
    "retinanet.anchors": ("retinanet.ops.anchors",),
    "retinanet.matching": ("retinanet.ops.matching",),
    "retinanet.postprocess": ("retinanet.ops.postprocess",),
    "retinanet.winograd": ("retinanet.model.conv", "retinanet.ops.winograd"),
    "retinanet.backbone": ("retinanet.model.backbone",),
    "retinanet.fpn": ("retinanet.model.fpn",),
    "retinanet.head": ("retinanet.model.head",),
    "retinanet.detector": ("retinanet.model.detector",),
    "retinanet.engine": ("retinanet.train", "retinanet.model.checkpoint", "retinanet.train.optim",
                         "retinanet.train.resume", "retinanet.train.distributed"),
    "retinanet.interop": ("retinanet.weights.torchvision",),
    "retinanet.pretrained": ("retinanet.weights.init_from",),
    "retinanet.predictor": ("retinanet.inference.predictor",),
    "retinanet.tiling": ("retinanet.inference.tiling",),
    "retinanet.export": ("retinanet.deploy",),
    "retinanet.anchor_tools": ("retinanet.tools.anchor_coverage", "retinanet.tools.anchor_fit",
                               "retinanet.tools.anchor_report", "retinanet.ops.anchors", "retinanet.ops.matching",
                               "retinanet.ops.boxes", "retinanet.ops.resize"),
    "retinanet.inspection": ("retinanet.tools.inspection",),
}  # fmt: skip


class _Alias(types.ModuleType):
    """An old module: its attributes are looked up in the new modules, in order."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"moved to {', '.join(homes)}")
        self._homes = [importlib.import_module(home) for home in homes]

    def __getattr__(self, attr: str):
        for home in self._homes:
            if hasattr(home, attr):
                return getattr(home, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {self._homes[0].__name__}) has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({name for home in self._homes for name in dir(home) if not name.startswith("_")})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        homes = MOVED[spec.name]
        warnings.warn(f"{spec.name} has moved to {homes[0]}; the old path goes in retinanet 0.3",
                      DeprecationWarning, stacklevel=3)  # fmt: skip
        return _Alias(spec.name, homes)

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Make the old module names importable (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
