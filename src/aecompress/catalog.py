"""What `aecompress methods` lists, read from the method modules' source without importing
them (importing a method imports torch, seconds before the first line could be printed).

The method classes stay the one place a method is described: a class decorated
`@register` gives its `name`, its docstring's first paragraph and its `Options` class's
fields (inherited ones first, as pydantic orders them). tests/test_catalog.py checks that
this reading equals the imported registry.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

METHODS_DIR = Path(__file__).parent / "methods"
# methods that rewrite the whole model instead of fitting matrix groups: name -> module
SLICEGPT = "slicegpt"
WHOLE_MODEL = {SLICEGPT: Path(__file__).parent / "pipeline" / "slicing.py"}


@dataclass(frozen=True)
class MethodEntry:
    name: str
    summary: str  # the docstring's first paragraph on one line
    options: tuple[str, ...]


def _assigned(node: ast.ClassDef, attribute: str) -> ast.expr | None:
    """The value of `attribute = value` in a class body."""
    for statement in node.body:
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
            and statement.targets[0].id == attribute
        ):
            return statement.value
    return None


def _base_names(node: ast.ClassDef) -> list[str]:
    return [base.id for base in node.bases if isinstance(base, ast.Name)]


def _is_registered(node: ast.ClassDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list)


class _Classes:
    """Every class defined in the methods package, by name."""

    def __init__(self, root: Path) -> None:
        self.nodes: dict[str, ast.ClassDef] = {}
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    self.nodes[node.name] = node

    def lookup(self, class_name: str, attribute: str) -> ast.expr | None:
        """`attribute` of a class or of its nearest base that assigns it."""
        node = self.nodes.get(class_name)
        if node is None:
            return None
        value = _assigned(node, attribute)
        for base in _base_names(node) if value is None else []:
            value = self.lookup(base, attribute)
            if value is not None:
                break
        return value

    def fields(self, class_name: str) -> list[str]:
        """Pydantic fields of an options class: the bases' first (the last base's first, as
        pydantic walks the method resolution order backwards), then its own new ones."""
        node = self.nodes.get(class_name)
        if node is None:
            return []
        found: list[str] = []
        for base in reversed(_base_names(node)):
            found += [name for name in self.fields(base) if name not in found]
        for statement in node.body:
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and "ClassVar" not in ast.unparse(statement.annotation)
                and statement.target.id not in found
            ):
                found.append(statement.target.id)
        return found


def summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join((doc or "").split("\n\n")[0].split())


@cache
def method_catalog(root: Path = METHODS_DIR) -> dict[str, MethodEntry]:
    """Every registered method by name, as its source declares it."""
    classes = _Classes(root)
    entries = {}
    for class_name, node in classes.nodes.items():
        if not _is_registered(node):
            continue
        name = classes.lookup(class_name, "name")
        options = classes.lookup(class_name, "Options")
        if not isinstance(name, ast.Constant) or not isinstance(name.value, str):
            raise ValueError(f"{class_name} is registered without a literal `name`")
        option_class = options.id if isinstance(options, ast.Name) else "MethodOptions"
        entries[name.value] = MethodEntry(
            name.value,
            summary(ast.get_docstring(node, clean=False)),
            tuple(classes.fields(option_class)),
        )
    return dict(sorted(entries.items()))


@cache
def whole_model_catalog() -> dict[str, MethodEntry]:
    """The methods that rewrite the whole model (no options), described by the first
    paragraph of their module's docstring."""
    return {
        name: MethodEntry(name, summary(ast.get_docstring(ast.parse(path.read_text()))), ())
        for name, path in WHOLE_MODEL.items()
    }
