"""The package's imports go one way: no module imports one of a higher layer."""

from __future__ import annotations

import ast
from pathlib import Path

import aecompress

# Bottom to top; a module may import modules of its own layer or of lower ones.
LAYERS = [
    [
        "errors",
        "version",
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
    ["sweep", "report", "cluster", "integrations"],
    ["cli", ""],  # "": the package's __init__
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def top_name(module: str) -> str:
    """'aecompress.methods.svd' -> 'methods'; 'aecompress' -> ''."""
    return module.removeprefix("aecompress").removeprefix(".").split(".")[0]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "aecompress"}


def test_no_module_imports_a_higher_layer():
    root = Path(aecompress.__file__).parent
    violations = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        own = "" if parts == ("__init__",) else parts[0]
        assert own in LAYER, f"{path}: add its package to LAYERS"
        for imported in imports(path):
            if LAYER[top_name(imported)] > LAYER[own]:
                violations.append(f"{'/'.join(parts)} imports {imported}")
    assert not violations, violations
