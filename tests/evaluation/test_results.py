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
