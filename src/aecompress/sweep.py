"""Grids of compression runs: every cell compresses, evaluates, and appends to a JSONL file.

A sweep is resumable: re-running it skips the cells (and dense evaluations) already in
the results file. A failing cell is recorded with its error and the sweep goes on. The
dense model of each model is evaluated once per task; calibration statistics are cached
on disk by the engine, so methods that share them compute them once.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aecompress.calibration import CalibrationConfig
from aecompress.engine import compress
from aecompress.errors import AecompressError, describe
from aecompress.evaluation.tasks import TASKS, run_task
from aecompress.models import LoadedModel, load_model
from aecompress.recipe import Recipe


class MethodSpec(BaseModel):
    """One method of the grid; `label` names it in tables (default: the method name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    groups: list[str] | None = None  # overrides the sweep's groups for this method

    @property
    def name(self) -> str:
        return self.label or self.method


class TaskSpec(BaseModel):
    """One evaluation task; `ratios` restricts it to some ratios (e.g. fine-tuning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    options: dict[str, Any] = Field(default_factory=dict)
    ratios: list[float] | None = None


class SweepRecipe(BaseModel):
    """The grid: models x methods x targets x groups x ratios x seeds, then tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    models: list[str] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    ratios: list[float] = Field(min_length=1)
    targets: list[str] = Field(min_length=1)
    groups: list[str] = Field(default_factory=lambda: ["none"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    tasks: list[TaskSpec] = Field(min_length=1)
    calibration: CalibrationConfig = CalibrationConfig()

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepRecipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
            return cls.model_validate(data or {})
        except (OSError, yaml.YAMLError) as error:
            raise AecompressError(f"cannot read sweep recipe {path}: {error}") from error
        except ValidationError as error:
            raise AecompressError(describe(error, f"sweep recipe {path}")) from error


def cells(sweep: SweepRecipe) -> Iterator[dict[str, Any]]:
    """Every cell of the grid as a JSON-ready dict (its identity in the results file).

    Ordered model, targets, ratio, then method: each comparison of methods is complete
    before the next begins, so a sweep stopped early leaves whole tables behind.
    """
    for model, targets, ratio, spec, seed in itertools.product(
        sweep.models, sweep.targets, sweep.ratios, sweep.methods, sweep.seeds
    ):
        for group in spec.groups or sweep.groups:
            yield {
                "model": model,
                "label": spec.name,
                "method": spec.method,
                "options": spec.options,
                "targets": targets,
                "group": group,
                "ratio": ratio,
                "seed": seed,
            }


def cell_id(cell: dict[str, Any]) -> str:
    """A cell's identity in the results file: its fields as JSON, keys sorted."""
    return json.dumps(cell, sort_keys=True)


def cell_key(cell: dict[str, Any], task: str) -> str:
    """One task of one cell: what a re-run skips when it is already recorded as ok."""
    return cell_id({**cell, "task": task})


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records of a results file; a torn last line (interrupted write) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def _tasks_for(sweep: SweepRecipe, ratio: float | None) -> list[TaskSpec]:
    return [t for t in sweep.tasks if ratio is None or t.ratios is None or ratio in t.ratios]


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N: this process runs every N-th cell from the I-th."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise AecompressError(f"shard must be I/N with 0 <= I < N (got '{text}')")
    return int(index), int(count)


def run_sweep(
    sweep: SweepRecipe, results: Path, progress: bool = True, shard: tuple[int, int] = (0, 1)
) -> list[dict[str, Any]]:
    """Run every cell not yet in `results`; returns all records.

    With shard (I, N), only every N-th cell from the I-th (and the dense model only in
    shard 0): N processes with the same results file share the grid between them.
    """
    index, count = shard
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {
        cell_key(r["cell"], r["task"])
        for r in read_results(results)
        if r.get("status") == "ok" and "cell" in r
    }
    dense_models: dict[str, LoadedModel] = {}
    for model_name in sweep.models:
        loaded = dense_models.setdefault(model_name, load_model(model_name))
        for spec in _tasks_for(sweep, None) if index == 0 else []:
            dense_cell = {"model": model_name, "label": "dense", "ratio": 1.0}
            if cell_key(dense_cell, spec.task) not in done:
                _run_and_record(
                    results, dense_cell, loaded, loaded, spec, {"compress_seconds": 0.0}
                )
    for number, cell in enumerate(cells(sweep)):
        if number % count != index:
            continue
        pending = [
            t for t in _tasks_for(sweep, cell["ratio"]) if cell_key(cell, t.task) not in done
        ]
        if not pending:
            continue
        _run_cell(sweep, cell, dense_models[cell["model"]], pending, results, progress)
    return read_results(results)


def _run_cell(
    sweep: SweepRecipe,
    cell: dict[str, Any],
    dense: LoadedModel,
    tasks: list[TaskSpec],
    results: Path,
    progress: bool,
) -> None:
    start = time.perf_counter()
    try:
        recipe = Recipe(
            model=cell["model"],
            method=cell["method"],
            options=cell["options"],
            ratio=cell["ratio"],
            targets=cell["targets"],
            group=cell["group"],
            seed=cell["seed"],
            calibration=sweep.calibration,
        )
        fresh = LoadedModel(
            copy.deepcopy(dense.model), dense.tokenizer, dense.source, dense.auto_class
        )
        compressed = compress(fresh, recipe, progress=progress)
    except Exception as error:  # a failing cell is recorded, the sweep goes on
        for spec in tasks:
            _append(results, _failure(cell, spec.task, error))
        return
    extra = {"compress_seconds": time.perf_counter() - start, **compressed.totals()}
    loaded = LoadedModel(compressed.model, dense.tokenizer, dense.source, dense.auto_class)
    for spec in tasks:
        _run_and_record(results, cell, loaded, dense, spec, extra)


def _run_and_record(
    results: Path,
    cell: dict[str, Any],
    loaded: LoadedModel,
    dense: LoadedModel,
    spec: TaskSpec,
    extra: dict[str, Any],
) -> None:
    """Run one task (the dense model is the reference of tasks that compare with it)."""
    try:
        result = run_task(
            spec.task,
            loaded.model,
            loaded.tokenizer,
            reference=dense.model if TASKS[spec.task].needs_reference else None,
            progress=False,
            **spec.options,
        )
    except Exception as error:
        _append(results, _failure(cell, spec.task, error))
        return
    _append(results, {"cell": cell, "status": "ok", **extra, **asdict(result)})


def _failure(cell: dict[str, Any], task: str, error: Exception) -> dict[str, Any]:
    return {
        "cell": cell,
        "task": task,
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(limit=5),
    }
