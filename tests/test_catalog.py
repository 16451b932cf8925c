"""The method catalog read from source equals the imported registry; listing methods,
tasks and help imports neither torch nor transformers."""

import subprocess
import sys

import pytest

from aecompress.catalog import SLICEGPT, method_catalog, summary, whole_model_catalog
from aecompress.methods import METHODS
from aecompress.pipeline import slicing


def test_catalog_equals_the_registry():
    catalog = method_catalog()
    assert list(catalog) == sorted(METHODS)
    for name, cls in METHODS.items():
        entry = catalog[name]
        assert entry.summary == summary(cls.__doc__)
        assert entry.options == tuple(cls.Options.model_fields)


def test_whole_model_methods_are_described_by_their_module():
    (entry,) = whole_model_catalog().values()
    assert entry.name == SLICEGPT and entry.summary == summary(slicing.__doc__)
    assert entry.name not in METHODS  # it fits no groups


def test_catalog_follows_inherited_options_and_names(tmp_path):
    (tmp_path / "base.py").write_text(
        "class MethodOptions: pass\n"
        "class Method:\n    Options = MethodOptions\n"
        "class AOptions(MethodOptions):\n    a: int = 1\n    b: ClassVar[int] = 2\n"
        "class BOptions(AOptions):\n    c: int = 1\n    a: int = 3\n"
    )
    (tmp_path / "m.py").write_text(
        "@register\nclass A(Method):\n    '''First\n    line.\n\n    More.'''\n"
        "    name = 'a'\n    Options = AOptions\n"
        "@register\nclass B(A):\n    name = 'b'\n    Options = BOptions\n"
        "@register\nclass C(B):\n    name = 'c'\n"
        "@register\nclass D(Method):\n    name = 'd'\n"
    )
    catalog = method_catalog.__wrapped__(tmp_path)
    assert [(e.name, e.summary, e.options) for e in catalog.values()] == [
        ("a", "First line.", ("a",)),
        ("b", "", ("a", "c")),
        ("c", "", ("a", "c")),
        ("d", "", ()),
    ]


@pytest.mark.parametrize("args", [["--help"], ["methods"], ["tasks"], ["evaluate", "--help"]])
def test_listing_commands_import_no_torch(args):
    code = (
        "import sys\n"
        "from aecompress.cli import app\n"
        f"app({args!r}, standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "|" in run.stdout or "Usage" in run.stdout


def test_importing_the_package_imports_no_torch_until_a_name_is_used():
    code = (
        "import sys, aecompress\n"
        "assert 'torch' not in sys.modules\n"
        "assert callable(aecompress.compress) and 'torch' in sys.modules\n"
        "assert aecompress.Recipe.__name__ == 'Recipe'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
