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

from aecompress.data import WIKITEXT2_FILES, data_file, file_sha256
from aecompress.errors import AecompressError
from aecompress.evaluation import glue, multiple_choice, sts
from aecompress.evaluation.kinds import TASK_NEEDS, require
from aecompress.evaluation.mlm import masked_lm_perplexity
from aecompress.evaluation.perplexity import perplexity
from aecompress.evaluation.results import TaskResult


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[..., dict[str, float]]  # run(model, tokenizer, **options) -> metrics
    metrics: tuple[str, ...]
    files: Mapping[str, tuple[str, ...]]  # split -> data files it reads; first = default split
    needs_reference: bool = False  # run also takes reference=<the dense model>

    @property
    def needs(self) -> str:
        """What the model must be: one of "causal-lm", "masked-lm", "encoder"."""
        return TASK_NEEDS[self.name]

    @property
    def split(self) -> str:
        return next(iter(self.files))

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


def _wikitext2_files() -> dict[str, tuple[str, ...]]:
    return {split: (WIKITEXT2_FILES[split],) for split in ("test", "validation", "train")}


def _glue_task(name: str) -> Task:
    spec = glue.GLUE_TASKS[name]
    return Task(f"glue-{name}", partial(glue.glue, name), spec.metrics, {"dev": spec.files})


def _probe_task(name: str) -> Task:
    spec = glue.GLUE_TASKS[name]
    return Task(f"glue-{name}-probe", partial(glue.probe, name), spec.metrics, {"dev": spec.files})


def _choice_task(name: str) -> Task:
    files = multiple_choice.DATASETS[name].files
    return Task(name, partial(multiple_choice.multiple_choice, name), ("acc", "acc_norm"), files)


_STSB_FILES = {split: (sts.STSB_FILES[split],) for split in ("test", "dev", "train")}

TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("wikitext2", wikitext2, ("perplexity",), _wikitext2_files()),
        Task("mlm", masked_lm_perplexity, ("perplexity",), _wikitext2_files()),
        Task("stsb", sts.stsb, ("spearman", "pearson"), _STSB_FILES),
        Task("fidelity", sts.fidelity, ("cosine",), {"dev": _STSB_FILES["dev"]}, True),
        *(_choice_task(name) for name in multiple_choice.DATASETS),
        *(_glue_task(name) for name in glue.GLUE_TASKS),
        *(_probe_task(name) for name in glue.GLUE_TASKS),
    ]
}

PROBE_NOTE = (
    "glue-*-probe: a frozen-feature probe, not the paper's fine-tuning: a logistic (ridge for "
    "STS-B) head on the frozen encoder's mean-pooled features of at most max_train (4000) "
    "train examples, dev metric; `evaluate --probe` runs it for the glue-* tasks given."
)


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


def task_table() -> str:
    """Every task with the model it needs, its metrics and its splits (default first), as an
    aligned Markdown table."""
    rows = [("task", "model", "metrics", "split (others)")]
    for task in TASKS.values():
        others = [split for split in task.files if split != task.split]
        splits = task.split + (f" ({', '.join(others)})" if others else "")
        rows.append((task.name, task.needs, ", ".join(task.metrics), splits))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n\n" + PROBE_NOTE


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
        if not isinstance(settings["split"], str) or settings["split"] not in task.files:
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
