import io

import pytest

from aecompress import progress
from aecompress.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_nested(inner_steps: int = 3) -> None:
    for _ in progress_bar(range(2), desc="outer"):
        for _ in progress_bar(range(inner_steps), desc="inner"):
            pass
    bar = progress_bar(total=2, desc="manual")
    bar.update()
    bar.set_postfix(loss="0.5")
    bar.update()
    bar.close()


def test_a_piped_log_gets_plain_lines_only(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    run_nested()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert [line.split(" (")[0] for line in lines] == ["outer: 2/2", "manual: 2/2"]
    assert "loss=0.5" in lines[1]
    assert progress._open_bars == 0


def test_a_slow_bar_writes_a_line_now_and_then(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    run_nested()
    assert "inner: 1/3" in log.getvalue() and "\r" not in log.getvalue()


def test_on_a_terminal_inner_bars_are_cleared_and_outer_ones_kept(monkeypatch):
    monkeypatch.setattr("sys.stderr", Terminal())
    kept = []
    original = progress._Bar.__init__

    def record(self, *args, **kwargs):
        kept.append((kwargs["desc"], kwargs["leave"]))
        original(self, *args, **kwargs)

    monkeypatch.setattr(progress._Bar, "__init__", record)
    run_nested()
    assert kept == [("outer", True), ("inner", False), ("inner", False), ("manual", True)]
    assert progress._open_bars == 0


@pytest.mark.parametrize("enabled", [False])
def test_a_disabled_bar_writes_nothing(monkeypatch, enabled):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    assert list(progress_bar(range(3), desc="x", enabled=enabled)) == [0, 1, 2]
    assert log.getvalue() == "" and progress._open_bars == 0


def test_a_bar_that_wrote_its_last_count_does_not_repeat_it(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    list(progress_bar(range(2), desc="once"))
    assert [line.split(" (")[0] for line in log.getvalue().splitlines()] == [
        "once: 1/2",
        "once: 2/2",
    ]
