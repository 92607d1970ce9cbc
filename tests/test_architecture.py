"""The package's layers (docs/architecture.md), read from the code: every module's imports, function-level ones
included, go only to its own layer or those below; there is no import cycle; no private name crosses a module; no
module grows past 450 lines; the training loop fits on one screen."""

import ast
import re
from pathlib import Path

import pytest

import retinanet

PACKAGE = Path(retinanet.__file__).parent
# lowest first; a module imports only from its own layer and those before it
LAYERS = [
    ("runtime", ["retinanet.runtime"]),
    ("config", ["retinanet.config"]),
    ("ops", ["retinanet.ops", "retinanet.losses"]),
    ("model", ["retinanet.model"]),
    ("weights", ["retinanet.weights"]),
    ("data", ["retinanet.data"]),
    ("inference", ["retinanet.inference"]),
    ("evaluation", ["retinanet.evaluation"]),
    ("tools", ["retinanet.tools"]),
    ("train", ["retinanet.train"]),
    ("deploy", ["retinanet.deploy"]),
    ("analysis", ["retinanet.analysis"]),
    ("commands", ["retinanet.commands"]),
    ("cli", ["retinanet.cli"]),
    ("package", ["retinanet"]),  # the public face: above everything
]
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def _imports(path: Path, module: str) -> list[tuple[int, str, str | None]]:
    """(line, imported module, name imported from it or None) for every retinanet import in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "retinanet"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            if base.split(".")[0] != "retinanet":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from retinanet.runtime import fastpath`: the submodule itself
                    found.append((node.lineno, sub, None))
                else:
                    found.append((node.lineno, base, alias.name))
    return found


def test_every_import_goes_down_the_layers():
    wrong = []
    for module, path in MODULES.items():
        for line, target, _ in _imports(path, module):
            if _layer(target) > _layer(module):
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({LAYERS[_layer(module)][0]}) "
                    f"imports {target} ({LAYERS[_layer(target)][0]})"
                )
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: {t for _, t, _ in _imports(p, m) if t in MODULES and t != m} for m, p in MODULES.items()}
    # a package imports its submodules; a submodule importing its own package's __init__ closes a loop
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(
                    " -> ".join(stack[stack.index(nxt) :] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_module():
    wrong = []
    for module, path in MODULES.items():
        aliases = {}
        tree = ast.parse(path.read_text())
        for line, target, name in _imports(path, module):
            if name is not None and name.startswith("_"):
                wrong.append(f"{module}:{line} imports {target}.{name}")
        for node in ast.walk(tree):  # `from retinanet.runtime import fastpath as fp` ... fp._x
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    full = a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}"
                    if full in MODULES:
                        aliases[a.asname or a.name.split(".")[-1]] = full
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.value.id in aliases
            ):
                wrong.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def test_every_layer_is_in_the_architecture_document():
    doc = (PACKAGE.parent.parent / "docs" / "architecture.md").read_text()
    missing = [
        m for m in MODULES if m != "retinanet" and f"`{m.removeprefix('retinanet.').replace('.', '/')}" not in doc
    ]
    assert not missing, f"modules docs/architecture.md does not describe: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_450_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split its second idea into a module of its own"


def test_the_training_loop_fits_on_one_screen():
    tree = ast.parse(MODULES["retinanet.train.loop"].read_text())
    (train,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    body = train.body[1:] if isinstance(train.body[0], ast.Expr) else train.body  # the docstring aside
    lines = body[-1].end_lineno - body[0].lineno + 1
    assert lines <= 60, f"train() is {lines} lines without its docstring"


DOC = (PACKAGE.parent.parent / "docs" / "architecture.md").read_text()


def test_every_module_the_architecture_document_names_exists():
    named = set(re.findall(r"`((?:[a-z_]+/)+[a-z_]+)[.`]", DOC)) - {"tests/test_architecture"}
    assert {"runtime/fastpath", "evaluation/coco", "ops/resize"} <= named
    missing = sorted(n for n in named if "retinanet." + n.replace("/", ".") not in MODULES)
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_layer_folder_is_in_the_documents_picture_in_the_order_of_the_layers():
    picture = DOC.split("```")[1]
    drawn = [line.split()[0].rstrip("/").removesuffix(".py") for line in picture.strip().splitlines()]
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders <= set(drawn), f"layer folders the picture leaves out: {sorted(folders - set(drawn))}"
    order = [name for name, _ in LAYERS if name in drawn]
    assert drawn[::-1] == order, "the picture (top: the highest layer) and LAYERS disagree"
