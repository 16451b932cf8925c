"""One task's measured result, and Markdown tables comparing results with the dense model's."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from aecompress.outputs import head


@dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: dict[str, float]
    split: str  # the split the metrics are measured on
    data_sha256: dict[str, str]  # data file (relative to the data folder) -> sha256
    settings: dict[str, Any]  # every option of the run, defaults included
    seconds: float  # wall time of the run
    stderr: dict[str, float] = field(default_factory=dict)  # metric -> its standard error

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TaskResult:
        """The result `to_json` wrote: text that is not JSON is a JSONDecodeError, JSON of
        another form (an older version, a missing field) a ValueError, wrong types (a metric
        that is a string) a pydantic ValidationError."""
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {f.name for f in fields(cls)}:
            raise ValueError("not a task result of this version")
        return _TASK_RESULT.validate_json(text, strict=True)


_TASK_RESULT = TypeAdapter(TaskResult)


RECORD_KEYS = {"model", "role", "task", "metrics"}  # of every record `evaluate --json` writes
_LARGEST_RECORDS_FILE = 1 << 24


def write_records(
    path: Path, model: str, results: Sequence[TaskResult], dense_results: Sequence[TaskResult]
) -> None:
    """Write the results as `evaluate --json` does: a JSON list, one record per task and role."""
    records = [{"model": model, "role": "compressed", **asdict(r)} for r in results]
    records += [{"model": model, "role": "dense", **asdict(r)} for r in dense_results]
    path.write_text(json.dumps(records, indent=2) + "\n")


def is_records_file(path: Path) -> bool:
    """Whether `path` holds what `write_records` writes (an earlier `evaluate --json`)."""
    try:
        data = json.loads(head(path, _LARGEST_RECORDS_FILE + 1))
    except (ValueError, RecursionError):  # not JSON (a larger file is cut), not UTF-8
        return False
    return isinstance(data, list) and all(
        isinstance(record, dict) and record.keys() >= RECORD_KEYS for record in data
    )


def _number(value: float, stderr: float | None = None) -> str:
    return f"{value:.2f}" + ("" if stderr is None else f" ± {stderr:.2f}")


def format_table(
    results: Sequence[TaskResult], dense_results: Sequence[TaskResult] | None = None
) -> str:
    """Markdown table: task, split, metric, value (and the dense value and the difference);
    a value with a standard error is printed as value ± stderr."""
    header = ["task", "split", "metric", "value"]
    dense = {(r.task, r.split): r for r in dense_results or []}
    if dense_results is not None:
        header += ["dense", "difference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for result in results:
        for metric, value in result.metrics.items():
            cells = [result.task, result.split, metric, _number(value, result.stderr.get(metric))]
            if dense_results is not None:
                base = dense.get((result.task, result.split))
                reference = None if base is None else base.metrics.get(metric)
                cells += (
                    ["", ""]
                    if base is None or reference is None
                    else [_number(reference, base.stderr.get(metric)), f"{value - reference:+.2f}"]
                )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
