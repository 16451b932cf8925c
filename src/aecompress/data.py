"""The evaluation and calibration text that ships in the repository's data/ folder, and
a user's own calibration text (`local_text`)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
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


STSB_FILES = {
    "train": "stsb/sts-train.csv",
    "dev": "stsb/sts-dev.csv",
    "test": "stsb/sts-test.csv",
}

# multiple-choice dataset -> split -> the files it reads (first split: the one lm-eval reports)
CHOICE_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "arc-easy": {
        "test": ("arc_easy/ARC-Easy-Test.jsonl",),
        "validation": ("arc_easy/ARC-Easy-Dev.jsonl",),
    },
    "piqa": {"validation": ("piqa/valid.jsonl", "piqa/valid-labels.lst")},
    "hellaswag": {"validation": ("hellaswag/hellaswag_val_full.txt",)},
}


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's tsv files are and how their rows read."""

    folder: str
    text_columns: tuple[int, ...]
    label_column: int
    header: bool
    labels: tuple[str, ...] | None  # class names in index order; None for regression
    metrics: tuple[str, ...]

    @property
    def files(self) -> tuple[str, str]:
        return f"glue/{self.folder}/train.tsv", f"glue/{self.folder}/dev.tsv"


GLUE_TASKS: dict[str, GlueTask] = {
    "mrpc": GlueTask("MRPC", (3, 4), 0, True, ("0", "1"), ("accuracy", "f1")),
    "rte": GlueTask("RTE", (1, 2), 3, True, ("entailment", "not_entailment"), ("accuracy",)),
    "stsb": GlueTask("STS-B", (7, 8), 9, True, None, ("pearson", "spearman")),
    "sst2": GlueTask("SST-2", (0,), 1, True, ("0", "1"), ("accuracy",)),
    "cola": GlueTask("CoLA", (3,), 1, False, ("0", "1"), ("matthews",)),
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


TEXT_FIELD = "text"  # the field of a JSONL record, parquet column or dataset column read


def local_text(path: Path) -> str:
    """The text of a local file or folder, records joined by blank lines: a plain text file
    (whole), a JSONL file or parquet file (each record's `text`), or a folder written by
    `datasets`' save_to_disk (its `text` column; of a DatasetDict, the `train` split)."""
    if path.is_dir():
        return "\n\n".join(_dataset_texts(path))
    if not path.is_file():
        raise AecompressError(f"no such text file or dataset folder: {path}")
    if path.suffix == ".jsonl":
        return "\n\n".join(_jsonl_texts(path))
    if path.suffix == ".parquet":
        return "\n\n".join(_parquet_texts(path))
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AecompressError(f"cannot read text file {path}: {error}") from error


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise AecompressError(f"{path} line {number} is not JSON: {error.msg}") from error
        if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
            raise AecompressError(f"{path} line {number} has no string field '{TEXT_FIELD}'")
        texts.append(record[TEXT_FIELD])
    return texts


def _column(names: list[str], where: Path) -> None:
    if TEXT_FIELD not in names:
        raise AecompressError(
            f"{where} has no '{TEXT_FIELD}' column (columns: {', '.join(names) or 'none'})"
        )


def _parquet_texts(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise AecompressError(f"reading {path} needs pyarrow: pip install pyarrow") from error
    try:
        schema = pq.read_schema(path)
        _column(schema.names, path)
        column = pq.read_table(path, columns=[TEXT_FIELD]).column(TEXT_FIELD)
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise AecompressError(f"cannot read parquet file {path}: {error}") from error
    return [text for text in column.to_pylist() if isinstance(text, str)]


def _dataset_texts(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError as error:
        raise AecompressError(f"reading {path} needs datasets: pip install datasets") from error
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as error:
        raise AecompressError(f"{path} is not a saved datasets folder: {error}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise AecompressError(f"{path} has no train split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    _column(list(loaded.column_names), path)
    return [text for text in loaded[TEXT_FIELD] if isinstance(text, str)]
