"""The on-disk cache (calibration statistics, dense results): where it lives, how it is
written and read.

Entries are written under a unique temporary name in their own folder and renamed into
place, so processes building the same entry never collide; an entry that cannot be read
is discarded with a warning (and rebuilt by the caller); a cache that cannot be written
only costs the reuse.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from safetensors import SafetensorError

from aecompress.errors import first_line

logger = logging.getLogger(__name__)

T = TypeVar("T")


class InvalidEntry(ValueError):
    """A cache entry that was read but holds what its writer never writes."""


# What reading a damaged entry raises: I/O, JSON / safetensors decoding, missing fields.
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)


def cache_dir() -> Path:
    """$AECOMPRESS_CACHE, else $XDG_CACHE_HOME/aecompress, else ~/.cache/aecompress."""
    if override := os.environ.get("AECOMPRESS_CACHE"):
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # the XDG spec: a relative path is invalid and is ignored
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "aecompress"


def read_entry(path: Path, read: Callable[[Path], T]) -> T | None:
    """`read(path)`, or None when there is no entry or it is unreadable or invalid (then
    deleted)."""
    if not path.is_file():
        return None
    try:
        return read(path)
    except _UNREADABLE as error:
        state = "invalid" if isinstance(error, InvalidEntry) else "unreadable"
        logger.warning(
            "discarding %s cache file %s (%s); it is computed again, nothing else is lost",
            state,
            path,
            first_line(error),
        )
        path.unlink(missing_ok=True)
        return None


def write_entry(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(temporary)` and rename the result to `path` (a failure only warns)."""
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        temporary = Path(name)
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("cannot write the cache file %s (%s)", path, error)
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
