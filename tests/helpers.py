"""Helpers shared by the command-line tests: the CLI run in this process, its one error."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from aecompress.cli import main


def invoke(*args: str) -> tuple[int, str, str]:
    """Run `aecompress ARGS` in this process: (exit status, stdout, stderr)."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["aecompress", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def one_error(code: int, err: str) -> str:
    """The one `aecompress: error:` line of a failed run (exit status 2, no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("aecompress: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err)
    return errors[0]


def tree(folder: Path) -> dict[str, object]:
    """Everything under `folder`, links not followed: path -> bytes, link target or '/'."""
    found: dict[str, object] = {}
    for root, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = f"-> {os.readlink(path)}"
            else:
                found[key] = "/" if path.is_dir() else path.read_bytes()
    return found


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """File permissions apply inside the block: a test run as root acts as nobody in it
    (the paths it touches must be reachable by anyone)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
