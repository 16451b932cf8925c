import json
import logging
from pathlib import Path

from aecompress.cache import cache_dir, read_entry, write_entry


def read_json(path: Path) -> object:
    return json.loads(path.read_text())


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("AECOMPRESS_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "aecompress"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # invalid per the XDG spec
    assert cache_dir() == tmp_path / "home" / ".cache" / "aecompress"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "aecompress"


def test_an_unwritable_cache_only_warns(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        write_entry(blocker / "entry.json", lambda p: p.write_text("{}"))
    assert "cannot write the cache file" in caplog.text


def test_an_unreadable_entry_is_discarded(tmp_path, caplog):
    path = tmp_path / "entry.json"
    path.write_text("{torn")
    with caplog.at_level(logging.WARNING):
        assert read_entry(path, read_json) is None
    assert "discarding unreadable cache file" in caplog.text and not path.exists()
    write_entry(path, lambda p: p.write_text("[1]"))
    assert read_entry(path, Path.read_text) == "[1]"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]  # no temporary left
