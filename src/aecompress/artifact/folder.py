"""Writing a model folder (an artifact or an export) safely: it is filled beside its place
and renamed into it, so a crash leaves no half-written folder, and it never replaces a
folder that holds anything but an artifact's own files (outputs.py checks that)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A fresh folder beside `path` to fill, renamed into its place when the block ends
    without error (a crash leaves no half-written folder), else deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield work
        work.chmod(0o755)
        _swap_into_place(work, path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def remove_leftovers(path: Path) -> None:
    """Delete `.NAME.tmp-PID-*` and `.NAME.old-PID` folders that interrupted writes of this
    artifact left, unless the process that made them still runs."""
    for leftover in path.parent.glob(f".{path.name}.*"):
        match = re.fullmatch(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)(?:-.*)?", leftover.name)
        if match and leftover.is_dir() and not _running(int(match.group(1))):
            shutil.rmtree(leftover, ignore_errors=True)


def copy_sentence_transformers_files(source: Path, work: Path) -> None:
    """Keep a sentence encoder's pooling set-up (modules.json, 1_Pooling/, ...) with it."""
    if not (source / "modules.json").is_file():
        return
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, work / name)
    for folder in source.glob("[0-9]_*"):
        if folder.is_dir():
            shutil.copytree(folder, work / folder.name)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(work: Path, path: Path) -> None:
    if not path.exists():
        os.replace(work, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(work, path)
    shutil.rmtree(old, ignore_errors=True)
