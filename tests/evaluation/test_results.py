import dataclasses
import json

import pytest

from aecompress.evaluation.results import TaskResult, format_table


def _result(task: str, value: float, split: str = "test") -> TaskResult:
    return TaskResult(task, {"spearman": value}, split, {"stsb/sts-test.csv": "ab"}, {}, 1.5)


def test_json_round_trip() -> None:
    result = _result("stsb", 61.39)
    assert TaskResult.from_json(result.to_json()) == result


def test_table_with_dense_values() -> None:
    table = format_table(
        [_result("stsb", 61.39), _result("fidelity", 1.0)], [_result("stsb", 82.03)]
    )
    assert table.splitlines() == [
        "| task | split | metric | value | dense | difference |",
        "|---|---|---|---:|---:|---:|",
        "| stsb | test | spearman | 61.39 | 82.03 | -20.64 |",
        "| fidelity | test | spearman | 1.00 |  |  |",
    ]


def test_table_without_dense_values() -> None:
    assert format_table([_result("stsb", 82.03)]).splitlines()[-1] == (
        "| stsb | test | spearman | 82.03 |"
    )


def test_an_older_or_foreign_result_is_refused() -> None:
    """A dense cache entry written before standard errors were recorded is not a result
    (the cache discards and rebuilds it)."""
    older = json.loads(_result("stsb", 61.39).to_json())
    del older["stderr"]
    with pytest.raises(ValueError, match="not a task result"):
        TaskResult.from_json(json.dumps(older))
    with pytest.raises(ValueError, match="not a task result"):
        TaskResult.from_json("[]")


def test_a_standard_error_is_printed_beside_its_value() -> None:
    piqa = TaskResult("piqa", {"acc": 61.2, "acc_norm": 62.0}, "validation", {}, {}, 1.0)
    with_stderr = dataclasses.replace(piqa, stderr={"acc": 1.14, "acc_norm": 1.13})
    dense = dataclasses.replace(piqa, metrics={"acc": 63.0, "acc_norm": 64.0})
    assert format_table([with_stderr], [dense]).splitlines()[2:] == [
        "| piqa | validation | acc | 61.20 ± 1.14 | 63.00 | -1.80 |",
        "| piqa | validation | acc_norm | 62.00 ± 1.13 | 64.00 | -2.00 |",
    ]
