"""Every registered task against its contract, on a tiny random model of the kind it needs:
its options' defaults and split are valid, unknown options and wrong types are refused,
its data files exist, and a short run reports exactly its metrics (and standard errors
only beside them), finite, recorded with its settings. A new task is tested here as is."""

from __future__ import annotations

import math
from typing import Any

import pytest
from transformers import PreTrainedModel

from aecompress.data import data_file
from aecompress.errors import AecompressError
from aecompress.evaluation.kinds import KINDS, model_kinds
from aecompress.evaluation.metrics import STDERR
from aecompress.evaluation.tasks import TASKS, run_task
from tests.conftest import tiny_model

TASK_NAMES = list(TASKS)  # every registered task
MODELS = {"causal-lm": "llama", "masked-lm": "bert", "encoder": "bert-encoder"}

# Options that shorten a run, each given to the tasks that take it.
QUICK: dict[str, Any] = {
    "windows": 1,
    "seq_len": 16,
    "limit": 3,
    "sentences": 8,
    "epochs": 1,
    "train_fraction": 0.005,
    "max_train": 16,
    "max_length": 32,
    "folds": 2,
}


def quick(name: str) -> dict[str, Any]:
    fields = TASKS[name].Options.model_fields
    return {key: value for key, value in QUICK.items() if key in fields}


@pytest.fixture(scope="module")
def models() -> dict[str, PreTrainedModel]:
    return {kind: tiny_model(arch) for kind, arch in MODELS.items()}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_a_task_declares_what_it_needs_reads_and_reports(name: str) -> None:
    task = TASKS[name]
    assert task.name == name and task.needs in KINDS and task.metrics
    for files in task.files.values():
        assert files and all(data_file(f).is_file() for f in files)
    defaults = task.settings({})
    assert defaults.get("split", task.split) == task.split
    assert set(defaults) == set(task.Options.model_fields)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_a_task_refuses_unknown_options_and_values_of_another_type(name: str) -> None:
    task = TASKS[name]
    with pytest.raises(AecompressError, match=f"task '{name}' has no option colour"):
        task.settings({"colour": 1})
    for option in task.defaults():  # no option takes a list
        with pytest.raises(AecompressError, match=f"task '{name}': {option}: "):
            task.settings({option: ["a list"]})


@pytest.mark.parametrize("name", TASK_NAMES)
def test_a_short_run_reports_the_declared_metrics(name, models, tokenizer) -> None:
    task = TASKS[name]
    model = models[task.needs]
    assert task.needs in model_kinds(model)
    reference = model if task.needs_reference else None
    result = run_task(name, model, tokenizer, reference=reference, progress=False, **quick(name))
    assert tuple(result.metrics) == task.metrics
    assert all(math.isfinite(value) for value in result.metrics.values())
    assert set(result.stderr) <= set(task.metrics)
    assert all(value >= 0 and math.isfinite(value) for value in result.stderr.values())
    assert result.settings == task.settings(quick(name))
    assert set(result.data_sha256) == set(task.files[result.split])


def test_metrics_with_a_standard_error_report_it(models, tokenizer) -> None:
    """Multiple choice and accuracy metrics carry lm-eval's standard error (n > 1)."""
    for name in ("piqa", "glue-rte-probe"):
        result = run_task(name, models[TASKS[name].needs], tokenizer, progress=False, **quick(name))
        expected = {"acc", "acc_norm"} if name == "piqa" else {"accuracy"}
        assert set(result.stderr) == expected, name
        assert not any(metric.endswith(STDERR) for metric in result.metrics)
