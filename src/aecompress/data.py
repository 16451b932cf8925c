"""The evaluation and calibration text that ships in the repository's data/ folder."""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

from aecompress.errors import AecompressError


def data_dir() -> Path:
    """The data folder: $AECOMPRESS_DATA, else the repository's data/."""
    override = os.environ.get("AECOMPRESS_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "data"


def data_file(relative: str) -> Path:
    """Path of a data file, with a one-line error if it is missing."""
    path = data_dir() / relative
    if not path.is_file():
        raise AecompressError(
            f"missing data file {path} (set AECOMPRESS_DATA to the folder holding {relative})"
        )
    return path


@cache
def file_sha256(path: Path) -> str:
    """sha256 of a data file (recorded beside every result)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


WIKITEXT2_FILES = {
    "train": "wikitext-2-raw/wiki.train.raw.partial.txt",
    "validation": "wikitext-2-raw/wiki.valid.raw",
    "test": "wikitext-2-raw/wiki.test.raw",
}


def wikitext2_text(split: str) -> str:
    """WikiText-2 raw text of a split, joined the GPTQ way ("\\n\\n".join of the HF rows).

    The test/validation files hold one HF row per line (blank lines are empty rows, other
    rows end with a newline). The train file is only a 1 MB prefix, already joined.
    """
    if split not in WIKITEXT2_FILES:
        raise AecompressError(f"unknown WikiText-2 split '{split}': {', '.join(WIKITEXT2_FILES)}")
    raw = data_file(WIKITEXT2_FILES[split]).read_text(encoding="utf-8")
    if split == "train":
        return raw
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    return "\n\n".join(rows)
