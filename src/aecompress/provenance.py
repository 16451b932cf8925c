"""Where a result was measured: library versions, CPU and its kernel level, host, commit."""

from __future__ import annotations

import platform
import subprocess
from functools import cache, partial
from pathlib import Path


@cache
def environment() -> dict[str, str]:
    """Where a record was measured: the same commit can give a compressed model a few
    percent apart on another host or install (other CPU kernels), so each record names
    them: library versions, torch's CPU kernel level, the CPU and, from a git checkout,
    the commit."""
    import torch
    import transformers

    from aecompress.version import __version__

    found = {
        "aecompress": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "host": platform.node(),
    }
    if commit := _source_commit():
        found["commit"] = commit
    return found


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source_commit() -> str:
    """The git commit of the checkout aecompress runs from, with "+changes" when its files
    differ from it; "" for an installed copy (even inside some other repository)."""
    here = Path(__file__).parent
    try:
        run = partial(subprocess.run, cwd=here, capture_output=True, text=True, timeout=10)
        if not run(["git", "ls-files", "--", Path(__file__).name]).stdout.strip():
            return ""  # this file is no tracked file of a checkout
        commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        changed = run(["git", "status", "--porcelain", "--", "."]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{commit}+changes" if commit and changed else commit
