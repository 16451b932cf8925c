"""Progress of long loops: tqdm bars on a terminal, plain lines in a piped log.

On a terminal, nested bars take one line per level: an inner bar (a group's training
epochs inside the loop over groups) is cleared when it ends, so the next inner bar takes
its line. When stderr is not a terminal (a log file, a pipe, CI), no bar is drawn: a bar
writes a plain line at most every PLAIN_INTERVAL seconds, and the outermost one a last
line when it ends; no carriage returns nor cursor movements reach the log (the command
line also turns off the libraries' own tqdm bars then, before importing them).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

PLAIN_INTERVAL = 30.0  # seconds between two lines of a bar in a piped log

_open_bars = 0  # bars open now: the depth of the next one


class _Lines:
    """The plain-text stand-in for a tqdm bar (the part of its interface used here)."""

    def __init__(
        self, iterable: Iterable[Any] | None, desc: str, total: int | None, depth: int
    ) -> None:
        self.iterable, self.desc, self.n = iterable, desc, 0
        self.total = total if total is not None else _length(iterable)
        self.outermost = depth == 0
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.written: int | None = None  # the count the last line showed
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= PLAIN_INTERVAL:
            self._write()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.outermost and self.written != self.n:
            self._write()
        _close_one()

    def _write(self) -> None:
        self.last, self.written = time.monotonic(), self.n
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        postfix = f", {self.postfix}" if self.postfix else ""
        elapsed = self.last - self.start
        print(f"{self.desc}: {count} ({elapsed:.0f} s{postfix})", file=sys.stderr, flush=True)


def _length(iterable: Iterable[Any] | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _close_one() -> None:
    global _open_bars
    _open_bars = max(0, _open_bars - 1)


class _Bar(tqdm):
    def close(self) -> None:
        if not getattr(self, "_counted_closed", True):
            self._counted_closed = True
            _close_one()
        super().close()


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
) -> Any:
    """A progress bar over `iterable` (or one advanced with .update()): see the module."""
    global _open_bars
    if not enabled:
        return tqdm(iterable, desc=desc, total=total, disable=True)
    depth = _open_bars
    _open_bars += 1
    if not sys.stderr.isatty():
        return _Lines(iterable, desc, total, depth)
    bar = _Bar(iterable, desc=desc, total=total, leave=depth == 0)
    bar._counted_closed = False
    return bar
