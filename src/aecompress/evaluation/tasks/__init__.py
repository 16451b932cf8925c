"""Evaluation tasks; importing this package registers every module in it."""

import importlib
import pkgutil

from aecompress.evaluation.tasks.base import (
    TASKS,
    Count,
    Real,
    Seed,
    Task,
    TaskOptions,
    check_task,
    known_task,
    options_table,
    register,
    run_task,
    runnable_tasks,
    streamed_tasks,
    streaming_refused,
    task_settings,
    task_table,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "TASKS",
    "Count",
    "Real",
    "Seed",
    "Task",
    "TaskOptions",
    "check_task",
    "known_task",
    "options_table",
    "register",
    "run_task",
    "runnable_tasks",
    "streamed_tasks",
    "streaming_refused",
    "task_settings",
    "task_table",
]
