"""What the benchmark scripts share: models, timing, processes, provenance, Markdown.

A benchmark is a sweep recipe (recipes/*.yaml, run by `aecompress sweep`) wherever the
sweep can express its cells. The scripts beside this module measure what a sweep cell does
not: run-time latency and memory of loaded artifacts (speed.py), a process's peak memory
against a model built for it (scale.py), an external library's reference numbers
(compensation.py), an inline reference that is not a method (ae_minilm.py), task
timings and a cross-check against lm-eval (evaluate_tasks.py, lm_eval_check.py), a
method's best case simulated before it is built (slicegpt_probe.py).
"""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aecompress.models import LoadedModel


# --- models -------------------------------------------------------------------------------


def fresh_copy(dense: LoadedModel) -> LoadedModel:
    """A deep copy of a loaded model to compress, the dense one left untouched."""
    from aecompress.models import LoadedModel

    return LoadedModel(copy.deepcopy(dense.model), dense.tokenizer, dense.source, dense.auto_class)


def fp32_copy(name: str, folder: Path) -> Path:
    """Model `name` written once as a plain fp32 folder (SmolLM2's GGUF is de-quantised at
    every load; a folder loads fast in each of many processes); `folder` if already there."""
    from aecompress.models import load_model

    if (folder / "config.json").is_file():
        return folder
    loaded = load_model(name)
    config = loaded.model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF's, not this folder's
    plain = type(loaded.model)(type(loaded.model.config)(**config))
    plain.load_state_dict(loaded.model.state_dict())
    plain.save_pretrained(folder)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    return folder


# --- timing and processes -----------------------------------------------------------------


@dataclass
class Stopwatch:
    """Wall time since creation."""

    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


@dataclass(frozen=True)
class ProcessRun:
    """A finished process: exit status, wall time, its own peak resident memory, output."""

    returncode: int
    seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str

    def last_line(self, stream: str) -> str:
        lines = getattr(self, stream).strip().splitlines()
        return lines[-1] if lines else f"exit status {self.returncode}"


def run_process(command: Sequence[str], env: dict[str, str], capture: bool = True) -> ProcessRun:
    """Run `command` to its end; peak RSS is that process's alone (wait4's ru_maxrss).
    Uncaptured output goes to this process's terminal."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        clock = Stopwatch()
        if capture:
            process = subprocess.Popen(list(command), env=env, stdout=out, stderr=err)
        else:
            process = subprocess.Popen(list(command), env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = clock.seconds()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ProcessRun(
            process.returncode, seconds, usage.ru_maxrss * 1024, out.read(), err.read()
        )


# --- provenance ---------------------------------------------------------------------------


def machine() -> str:
    """CPU, cores, architecture, torch and Python versions."""
    import torch

    from aecompress.provenance import cpu_model

    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def threads() -> str:
    """torch's intra-op threads and the OMP_NUM_THREADS it was started with."""
    import torch

    return (
        f"{torch.get_num_threads()} torch threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    )


def load_average(digits: int = 1) -> str:
    """1 / 5 / 15 minute load averages (other processes sharing the CPUs)."""
    try:
        return " / ".join(f"{x:.{digits}f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores the machine's processes kept busy over the next `seconds` (this
    process waits meanwhile): what others take from a timing run, unlike the load average,
    which lags by minutes."""
    import psutil

    return psutil.cpu_percent(interval=seconds) / 100 * (psutil.cpu_count() or 1)


def utc_now() -> str:
    return f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"


def command() -> str:
    """This script's command line, as run from the repository's root."""
    return " ".join(["PYTHONPATH=src python", *sys.argv])


def provenance(started: str) -> list[str]:
    """Markdown bullets: when, where, how busy the machine was, and the command."""
    return [
        f"- date: {started}",
        f"- machine: {machine()}; {threads()}",
        f"- load average at the end: {load_average()} (other processes may share the CPUs: "
        "wall times are upper bounds)",
        f"- command: `{command()}`",
    ]


# --- Markdown -----------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Lines of a Markdown table; cells are written with str()."""
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    lines += [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]
    return lines


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path`, making its folder; prints where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return path
