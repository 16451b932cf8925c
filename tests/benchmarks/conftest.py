"""Benchmark scripts run as their command lines run them, in this process, on tiny models."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import runpy
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny, tiny_tokenizer

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
if str(BENCHMARKS) not in sys.path:  # the scripts import their shared module as `common`
    sys.path.insert(0, str(BENCHMARKS))


def run_script(name: str, *args: str) -> None:
    """`python benchmarks/NAME.py ARGS`, in this process."""
    path = str(BENCHMARKS / f"{name}.py")
    argv, sys.argv = sys.argv, [path, *args]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = argv


def run_in_this_process(command: Sequence[str], env: dict[str, str], capture: bool = True):
    """common.run_process's stand-in: `python SCRIPT ARGS` or `python -c CODE ARGS` run in
    this process under `env` (a test saves each child's start-up, seconds of imports)."""
    from common import ProcessRun

    _, first, *rest = command
    out, saved = io.StringIO(), dict(os.environ)
    argv, sys.argv = sys.argv, ["-c" if first == "-c" else first, *rest[first == "-c" :]]
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out):
            if first == "-c":
                exec(compile(rest[0], "<string>", "exec"), {"__name__": "__main__"})
            else:
                runpy.run_path(first, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(saved)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ProcessRun(code, 0.0, peak, out.getvalue(), "")


@pytest.fixture
def children_in_this_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The scripts' child processes run in this process (torch's thread count restored)."""
    import common

    monkeypatch.setattr(common, "run_process", run_in_this_process)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def save_tiny(folder: Path, arch: str) -> str:
    make_tiny(arch).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama (causal LM) with its word-level tokenizer, as a model folder."""
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def encoder_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT encoder (a sentence encoder's shape), as a model folder."""
    return save_tiny(tmp_path_factory.mktemp("encoder"), "bert-encoder")
