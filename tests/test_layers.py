"""The package's imports go one way: no module imports one of a higher layer, and no
module imports itself through others (no cycle in the graph of modules), counting every
import of every module: subpackages, relative imports (`from . import x`, `from ..methods
import y`), imports inside functions and under TYPE_CHECKING. An import counts as one of
the module it names (`from aecompress.methods.base import X`: methods.base, not the
package methods above it); importlib's dynamic imports (a package loading its own
modules to register them) are not seen."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import aecompress

# Bottom to top; a module may import modules of its own layer or of lower ones.
LAYERS = [
    [
        "errors",
        "version",
        "provenance",  # versions, CPU, host, commit (torch imported when asked)
        "data",
        "cache",
        "tensorfile",
        "numerics",
        "memory",
        "outputs",
        "catalog",  # reads the methods' source, imports none of them
        "recommended",
        "progress",
    ],
    ["models", "modules", "budget"],
    ["targets"],
    ["streaming"],  # a model's blocks filled from disk one at a time
    ["calibration"],
    ["methods"],
    ["recipe"],  # validates method names and options
    ["substitution"],
    ["compressed"],  # the result types; the artifact registers its writer with them
    ["pipeline"],  # the engine hands it the validation metric (evaluation)
    ["artifact"],
    ["evaluation"],
    ["summary"],
    ["engine"],
    ["estimate"],  # the peak memory a compress run expects, from a skeleton
    ["streamed"],  # compressing into a folder, streamed from disk when too large
    ["sweep", "report", "cluster", "integrations"],
    ["cli", ""],  # "": the package's __init__
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}
ROOT = Path(aecompress.__file__).parent


def module_name(path: Path, root: Path = ROOT) -> str:
    """'.../aecompress/methods/svd.py' -> 'aecompress.methods.svd'; a package's
    __init__.py -> the package's name."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((root.name, *parts))


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package (packages included) -> its file."""
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def top_name(module: str) -> str:
    """'aecompress.methods.svd' -> 'methods'; 'aecompress' -> ''."""
    return module.removeprefix("aecompress").removeprefix(".").split(".")[0]


def _base(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The module a `from` import names: relative ones resolved against `importer`."""
    if level == 0:
        return module or ""
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, *([module] if module else [])])


def _owner(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` is or lies in ('a.b.C' -> 'a.b')."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(source: str, importer: str, is_package: bool, known: set[str]) -> set[str]:
    """The known modules that `source` (the text of module `importer`) imports anywhere:
    `from X import y` counts as importing X.y when that is a module, else X."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(filter(None, (_owner(a.name, known) for a in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = _base(importer, is_package, node.level, node.module)
            for alias in node.names:
                target = _owner(f"{base}.{alias.name}", known)
                if target is not None:
                    found.add(target)
    return found - {importer}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Every module of the package -> the modules of the package it imports."""
    modules = package_modules(root)
    known = set(modules)
    return {
        name: imported_modules(path.read_text(), name, path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted:
    the modules that import each other, directly or through others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _edges(graph: dict[str, set[str]]) -> Iterator[tuple[str, str]]:
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            yield importer, target


def test_every_module_belongs_to_a_layer():
    unknown = [name for name in package_modules() if top_name(name) not in LAYER]
    assert not unknown, f"add their packages to LAYERS: {unknown}"


def test_no_module_imports_a_higher_layer():
    violations = [
        f"{importer} imports {target}"
        for importer, target in _edges(import_graph())
        if LAYER[top_name(target)] > LAYER[top_name(importer)]
    ]
    assert not violations, violations


def test_no_import_cycle_anywhere():
    assert cycles(import_graph()) == []


def test_relative_imports_and_submodules_are_resolved(tmp_path):
    root = tmp_path / "aecompress"
    files = {
        "__init__.py": "from aecompress.evaluation import runner\n",
        "methods/__init__.py": "from .base import Method\n",
        "methods/base.py": "import aecompress.errors\n",
        "methods/svd.py": "from . import base\nfrom ..pipeline import plan\n",
        "pipeline/__init__.py": "",
        "pipeline/plan.py": "def f():\n    from ..methods.svd import Svd\n",
        "evaluation/__init__.py": "",
        "evaluation/runner.py": "from aecompress import methods\n",
        "errors.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph == {
        "aecompress": {"aecompress.evaluation.runner"},
        "aecompress.errors": set(),
        "aecompress.evaluation": set(),
        "aecompress.evaluation.runner": {"aecompress.methods"},
        "aecompress.methods": {"aecompress.methods.base"},
        "aecompress.methods.base": {"aecompress.errors"},
        "aecompress.methods.svd": {"aecompress.methods.base", "aecompress.pipeline.plan"},
        "aecompress.pipeline": set(),
        "aecompress.pipeline.plan": {"aecompress.methods.svd"},
    }
    # methods.svd -> pipeline.plan (a higher layer) -> methods.svd, inside a function
    assert cycles(graph) == [["aecompress.methods.svd", "aecompress.pipeline.plan"]]
