"""The one interface every evaluation task implements, and the task registry.

A task says what model it needs (a kind of `kinds.KINDS`), which options it takes (a
pydantic model: an unknown key or a value of the wrong type is an error, so a typo in a
sweep recipe or a `--task-option` fails loudly), the metrics it reports, and the data
files of each of its splits (the first split is the default). `run` returns each metric,
and NAME_stderr beside a metric that has a standard error (lm-eval's naming).

Adding a task is one file in this package: a `Task` subclass, and `register` called with
each task it defines (a family such as GLUE registers several).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from aecompress.data import data_file, file_sha256
from aecompress.errors import AecompressError, describe
from aecompress.evaluation.kinds import KINDS, model_kinds
from aecompress.evaluation.metrics import STDERR
from aecompress.evaluation.results import TaskResult

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from aecompress.evaluation.common import Forward

# Something counted (windows, items, epochs, ...): a whole number >= 1.
Count = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]  # what torch.manual_seed takes


def _number_text(value: Any) -> Any:
    """Text that spells a number, as the number: YAML 1.1 reads 2e-5 (no dot) as text."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# A finite real number (an int, a float, or text such as 2e-5 that spells one)
Real = Annotated[float, BeforeValidator(_number_text), Field(allow_inf_nan=False)]


class TaskOptions(BaseModel):
    """Options of a task and their defaults; unknown keys are an error, and so is a value
    of another type (strict: "false" is not a bool, 2.0 not a count; an int is a float)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True)
class Task(ABC):
    """An evaluation task: what it needs, its options, its metrics, its splits' files."""

    name: str
    metrics: tuple[str, ...]
    files: Mapping[str, tuple[str, ...]]  # split -> data files it reads; first = default split

    needs: ClassVar[str]  # one of KINDS: "causal-lm", "masked-lm", "encoder"
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    needs_reference: ClassVar[bool] = False  # run also takes reference=<the dense model>
    streams: ClassVar[bool] = False  # measure: can run streamed, block by block
    note: ClassVar[str] = ""  # a line under the task table (e.g. what a probe is)

    @property
    def split(self) -> str:
        """The default split."""
        return next(iter(self.files))

    def defaults(self) -> dict[str, Any]:
        """The options and their default values."""
        return self.Options().model_dump()

    def settings(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Every setting of a run with `options`: validated, defaults and split filled in."""
        unknown = sorted(str(key) for key in set(options) - set(self.Options.model_fields))
        if unknown:
            raise AecompressError(
                f"task '{self.name}' has no option {', '.join(unknown)} "
                f"(options: {', '.join(self.Options.model_fields) or 'none'})"
            )
        try:
            settings = self.Options.model_validate(dict(options)).model_dump()
        except ValidationError as error:
            raise AecompressError(describe(error, f"task '{self.name}'")) from error
        if "split" in settings:
            settings["split"] = settings["split"] or self.split
            if settings["split"] not in self.files:
                raise AecompressError(
                    f"task '{self.name}' has no split '{settings['split']}': "
                    f"{', '.join(self.files)}"
                )
        return settings

    @abstractmethod
    def run(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        *,
        reference: PreTrainedModel | None,
        progress: bool,
    ) -> dict[str, float]:
        """The metrics (and NAME_stderr of those that have one) of `model` with `settings`
        (as `settings` returns them); `reference` is the dense model when needs_reference."""

    def measure(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        *,
        forward: Forward | None,
        progress: bool,
    ) -> dict[str, float]:
        """As `run`, with the logits from `forward` (evaluation/streamed.py; None: the
        model in memory): tasks that score logits (`streams`) only."""
        raise streaming_refused(self.name)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make a task available by its name (a one-line error for a duplicate or a bad task)."""
    if task.name in TASKS:
        raise AecompressError(f"task '{task.name}' is registered twice")
    if task.needs not in KINDS or not task.metrics or not task.files:
        raise AecompressError(f"task '{task.name}' needs a kind, metrics and data files")
    task.defaults()  # the options' defaults must be valid
    TASKS[task.name] = task
    return task


def ordered_tasks() -> list[Task]:
    """The registered tasks, grouped by the model kind they need (in KINDS' order)."""
    kinds = list(KINDS)
    return sorted(TASKS.values(), key=lambda task: kinds.index(task.needs))


def streamed_tasks() -> list[str]:
    """The tasks that can run streamed, block by block."""
    return [task.name for task in ordered_tasks() if task.streams]


def streaming_refused(name: str) -> AecompressError:
    """The one-line error of task `name` asked to run streamed when it cannot."""
    return AecompressError(
        f"task '{name}' cannot run streamed (block by block): only {', '.join(streamed_tasks())} "
        "can"
    )


def known_task(name: str) -> Task:
    """The task called `name`; else a one-line AecompressError listing the known tasks."""
    if name not in TASKS:
        known = ", ".join(task.name for task in ordered_tasks())
        raise AecompressError(f"unknown task '{name}': known tasks are {known}")
    return TASKS[name]


def runnable_tasks(model: nn.Module) -> list[str]:
    """The tasks `model` can run."""
    kinds = model_kinds(model)
    return [task.name for task in ordered_tasks() if task.needs in kinds]


def check_task(name: str, model: nn.Module) -> Task:
    """The task called `name`, if `model` can run it; else a one-line AecompressError."""
    task = known_task(name)
    if task.needs not in model_kinds(model):
        runnable = ", ".join(runnable_tasks(model)) or "none of the tasks"
        raise AecompressError(
            f"task '{name}' needs {KINDS[task.needs]}; this model ({type(model).__name__}) "
            f"can run: {runnable}"
        )
    return task


def task_settings(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting of a run of task `name` with `options`: defaults filled in, checked."""
    return known_task(name).settings(options)


def task_table() -> str:
    """Every task with the model it needs, its metrics and its splits (default first), as an
    aligned Markdown table, then the tasks' notes."""
    rows = [("task", "model", "metrics", "split (others)")]
    for task in ordered_tasks():
        others = [split for split in task.files if split != task.split]
        splits = task.split + (f" ({', '.join(others)})" if others else "")
        rows.append((task.name, task.needs, ", ".join(task.metrics), splits))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = dict.fromkeys(task.note for task in ordered_tasks() if task.note)
    return "\n\n".join(["\n".join(lines), *notes])


def options_table() -> str:
    """Each task's options with their defaults (tasks sharing their options on one row), as
    a Markdown table."""
    shared: dict[type[TaskOptions], list[str]] = {}
    for task in ordered_tasks():
        shared.setdefault(task.Options, []).append(task.name)
    lines = ["| tasks | options (default) |", "|---|---|"]
    for options, names in shared.items():
        defaults = options().model_dump()
        listed = ", ".join(f"{key} ({_yaml(value)})" for key, value in defaults.items())
        lines.append(f"| {', '.join(names)} | {listed or '-'} |")
    return "\n".join(lines)


def _yaml(value: Any) -> str:
    """A default as one writes it in YAML (true, null, 2e-05, test)."""
    return value if isinstance(value, str) else json.dumps(value)


def run_task(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    reference: PreTrainedModel | None = None,
    progress: bool = True,
    forward: Forward | None = None,
    **options: Any,
) -> TaskResult:
    """Check, run and time one task; `reference` is the dense model for tasks that need it,
    `forward` the streamed logits of `model` (a skeleton) for tasks that stream."""
    task = check_task(name, model)
    if tokenizer is None:
        raise AecompressError(f"task '{name}' needs the model's tokenizer, and none was found")
    settings = task.settings(options)
    split = settings.get("split", task.split)
    hashes = {f: file_sha256(data_file(f)) for f in task.files[split]}
    if task.needs_reference and reference is None:
        raise AecompressError(f"task '{name}' needs the dense reference model")
    start = time.perf_counter()
    if forward is None:
        found = task.run(model, tokenizer, settings, reference=reference, progress=progress)
    else:
        found = task.measure(model, tokenizer, settings, forward=forward, progress=progress)
    seconds = time.perf_counter() - start
    metrics = {metric: found[metric] for metric in task.metrics}
    stderr = {m: found[m + STDERR] for m in task.metrics if m + STDERR in found}
    return TaskResult(name, metrics, split, hashes, settings, seconds, stderr)
