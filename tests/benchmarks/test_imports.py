import importlib

import pytest

from tests.benchmarks.conftest import SCRIPTS


def test_every_benchmark_script_is_found():
    assert {"common", "speed", "scale", "compensation", "ae_minilm"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__  # says what it measures and how to run it
