"""The task registry: what each evaluation task needs, reads and reports, and how to run it."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.data import data_file, file_sha256
from aecompress.errors import AecompressError
from aecompress.evaluation import glue, multiple_choice, sts
from aecompress.evaluation.catalog import TASK_FACTS, TaskFacts
from aecompress.evaluation.kinds import require
from aecompress.evaluation.mlm import masked_lm_perplexity
from aecompress.evaluation.perplexity import perplexity
from aecompress.evaluation.results import TaskResult


@dataclass(frozen=True)
class Task:
    """A task's facts (catalog.py: model kind, metrics, files) and the function that runs
    it: run(model, tokenizer, **options) -> metrics."""

    facts: TaskFacts
    run: Callable[..., dict[str, float]]

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.facts.metrics

    @property
    def files(self) -> Mapping[str, tuple[str, ...]]:
        return self.facts.files

    @property
    def needs(self) -> str:
        return self.facts.needs

    @property
    def needs_reference(self) -> bool:
        return self.facts.needs_reference

    @property
    def split(self) -> str:
        return self.facts.split

    def defaults(self) -> dict[str, Any]:
        """The run's options and their default values (progress excluded)."""
        return {
            name: p.default
            for name, p in inspect.signature(self.run).parameters.items()
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and name != "progress"
        }


def wikitext2(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "test",
    seq_len: int = 512,
    windows: int | None = 16,
    full: bool = False,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, float]:
    """Token-level perplexity on the joined WikiText-2 raw split: the first `windows`
    non-overlapping windows of `seq_len` tokens, or all of them with `full`."""
    require("wikitext2", model)
    result = perplexity(
        model,
        tokenizer,
        split=split,
        seq_len=seq_len,
        windows=None if full else windows,
        batch_size=batch_size,
        progress=progress,
    )
    return {"perplexity": result.perplexity}


def _runner(name: str) -> Callable[..., dict[str, float]]:
    """The function that runs the task called `name`."""
    if name.startswith("glue-"):
        glue_name = name.removeprefix("glue-").removesuffix("-probe")
        return partial(glue.probe if name.endswith("-probe") else glue.glue, glue_name)
    if name in multiple_choice.DATASETS:
        return partial(multiple_choice.multiple_choice, name)
    runners: dict[str, Callable[..., dict[str, float]]] = {
        "wikitext2": wikitext2,
        "mlm": masked_lm_perplexity,
        "stsb": sts.stsb,
        "fidelity": sts.fidelity,
    }
    return runners[name]


TASKS: dict[str, Task] = {name: Task(facts, _runner(name)) for name, facts in TASK_FACTS.items()}


def probe_tasks(names: list[str]) -> list[str]:
    """`names` with each GLUE fine-tuning task replaced by its frozen-feature probe (other
    tasks kept); a one-line AecompressError if none of them has a probe."""
    probes = [f"{name}-probe" if f"{name}-probe" in TASKS else name for name in names]
    if not any(name.endswith("-probe") and name in TASKS for name in probes):
        raise AecompressError(
            f"--probe applies to the glue-* tasks (got {', '.join(names) or 'no task'})"
        )
    return probes


def known_task(name: str) -> Task:
    """The task called `name`; else a one-line AecompressError listing the known tasks."""
    if name not in TASKS:
        raise AecompressError(f"unknown task '{name}': known tasks are {', '.join(TASKS)}")
    return TASKS[name]


def check_task(name: str, model: nn.Module) -> Task:
    """The task called `name`, if `model` can run it; else a one-line AecompressError."""
    task = known_task(name)
    require(name, model)
    return task


def task_settings(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every setting of a run of task `name` with `options`: defaults filled in, checked."""
    return _settings(known_task(name), options)


# Options that count something: whole numbers >= 1 (or None where a task allows it).
_COUNTS = (
    "windows",
    "seq_len",
    "limit",
    "batch_size",
    "sentences",
    "epochs",
    "grad_accum",
    "max_length",
    "max_train",
    "folds",
)


def _settings(task: Task, options: dict[str, Any]) -> dict[str, Any]:
    defaults = task.defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise AecompressError(
            f"task '{task.name}' has no option {', '.join(unknown)} "
            f"(options: {', '.join(defaults) or 'none'})"
        )
    for name in _COUNTS:
        value = options.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise AecompressError(
                f"task '{task.name}': {name} must be a whole number >= 1 (got {value!r})"
            )
    settings = {**defaults, **options}
    if "split" in settings:
        settings["split"] = settings["split"] or task.split
        if settings["split"] not in task.files:
            raise AecompressError(
                f"task '{task.name}' has no split '{settings['split']}': {', '.join(task.files)}"
            )
    return settings


def run_task(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    reference: PreTrainedModel | None = None,
    progress: bool = True,
    **options: Any,
) -> TaskResult:
    """Check, run and time one task; `reference` is the dense model for tasks that need it."""
    task = check_task(name, model)
    if tokenizer is None:
        raise AecompressError(f"task '{name}' needs the model's tokenizer, and none was found")
    settings = _settings(task, options)
    split = settings.get("split", task.split)
    hashes = {f: file_sha256(data_file(f)) for f in task.files[split]}
    extra: dict[str, Any] = {}
    if task.needs_reference:
        if reference is None:
            raise AecompressError(f"task '{name}' needs the dense reference model")
        extra["reference"] = reference
    start = time.perf_counter()
    metrics = task.run(model, tokenizer, progress=progress, **settings, **extra)
    return TaskResult(name, metrics, split, hashes, settings, time.perf_counter() - start)
