"""Grids of compression runs: every cell compresses, evaluates, and appends to a JSONL file.

A sweep is resumable: re-running it skips the cells (and dense evaluations) whose latest
record in the results file is ok with the same method options, calibration and task
settings. A failing cell is recorded with its error (once: a re-run that fails in the
same way appends nothing) and the sweep goes on. The
dense model of each model is evaluated once per task; calibration statistics are cached
on disk by the engine, so methods that share them compute them once. Cells run in this
process, one after the other, or on an executor (cluster.py: a child process per cell,
or Ray); either way only this process writes the results file.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aecompress.calibration import CalibrationConfig, Seed
from aecompress.engine import compress
from aecompress.errors import AecompressError, describe
from aecompress.evaluation.tasks import TASKS, run_task, task_settings
from aecompress.methods.stage import QuantStage
from aecompress.models import LoadedModel, load_model, model_identity
from aecompress.outputs import PlainName
from aecompress.provenance import environment
from aecompress.recipe import Recipe, read_yaml

logger = logging.getLogger(__name__)


class MethodSpec(BaseModel):
    """One method of the grid; `label` names it in tables (default: the method name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    groups: list[str] | None = None  # overrides the sweep's groups for this method
    targets: list[str] | None = None  # only these of the sweep's targets (default: all)
    ratios: list[float] | None = None  # only these of the sweep's ratios (default: all)
    # further recipe fields of this method's cells (e.g. pipeline: sequential, refine: 40;
    # calibration replaces the sweep's)
    recipe: dict[str, Any] = Field(default_factory=dict)

    @field_validator("recipe")
    @classmethod
    def _recipe_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = set(value) - RECIPE_FIELDS
        if unknown:
            raise ValueError(f"use {', '.join(sorted(RECIPE_FIELDS))} (got {sorted(unknown)})")
        if "quantize" in value:  # one spelling per stage, so that it names one cell
            value = {**value, "quantize": str(QuantStage.model_validate(value["quantize"]))}
        return value

    @property
    def name(self) -> str:
        """The label, by default the method and its quantization stage (`sparsegpt +
        int4:g64:gptq`)."""
        stage = self.recipe.get("quantize")
        return self.label or (f"{self.method} + {stage}" if stage else self.method)


RECIPE_FIELDS = {
    "calibration",
    "pipeline",
    "sequential",
    "refine",
    "allocate",
    "storage_dtype",
    "quantize",
    "untie_embeddings",
    "device",
}


class TaskSpec(BaseModel):
    """One evaluation task, its options validated by the task's own model; `ratios`
    restricts it to some ratios (e.g. fine-tuning), `labels` to some methods' cells and
    `targets` to some targets' (the dense model runs every task)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    options: dict[str, Any] = Field(default_factory=dict)
    ratios: list[float] | None = None
    labels: list[str] | None = None
    targets: list[str] | None = None

    def runs_on(self, cell: dict[str, Any]) -> bool:
        """Whether a compressed cell (label, ratio, targets) is among this task's."""
        return all(
            allowed is None or cell[field] in allowed
            for field, allowed in (
                ("ratio", self.ratios),
                ("label", self.labels),
                ("targets", self.targets),
            )
        )

    @model_validator(mode="after")
    def _known_task_and_options(self) -> TaskSpec:
        try:
            task_settings(self.task, self.options)
        except AecompressError as error:
            raise ValueError(str(error)) from error
        return self


class Resources(BaseModel):
    """What each cell asks of a cluster (`--executor ray`); the serial executor ignores it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(default=1, gt=0)
    gpus: float = Field(default=0, ge=0)


class SweepRecipe(BaseModel):
    """The grid: models x methods x targets x groups x ratios x seeds, then tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PlainName  # of the default results folder, results/<name>/
    models: list[str] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    ratios: list[float] = Field(min_length=1)
    targets: list[str] = Field(min_length=1)
    groups: list[str] = Field(default_factory=lambda: ["none"])
    seeds: list[Seed] = Field(default_factory=lambda: [0])
    tasks: list[TaskSpec] = Field(min_length=1)
    calibration: CalibrationConfig = CalibrationConfig()
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _method_subsets(self) -> SweepRecipe:
        for where, spec in [(f"method {m.name}", m) for m in self.methods] + [
            (f"task {t.task}", t) for t in self.tasks
        ]:
            for axis, values, allowed in (
                ("targets", spec.targets, self.targets),
                ("ratios", spec.ratios, self.ratios),
            ):
                unknown = [v for v in values or [] if v not in allowed]
                if unknown:
                    raise ValueError(
                        f"{where}: {axis} {unknown} are not among the sweep's {axis} {allowed}"
                    )
        labels = {spec.name for spec in self.methods}
        for task in self.tasks:
            unknown = sorted(set(task.labels or []) - labels)
            if unknown:
                raise ValueError(f"task {task.task}: labels {unknown} name no method")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepRecipe:
        data = read_yaml(path, "sweep recipe")
        try:
            return cls.model_validate(data or {})
        except ValidationError as error:
            raise AecompressError(describe(error, f"sweep recipe {path}")) from error


def cells(sweep: SweepRecipe) -> Iterator[dict[str, Any]]:
    """Every cell of the grid as a JSON-ready dict (its identity in the results file).

    Ordered model, targets, ratio, then method: each comparison of methods is complete
    before the next begins, so a sweep stopped early leaves whole tables behind.
    """
    # a calibration other than the default is part of every cell's identity
    calibration = sweep.calibration.model_dump()
    custom = {"calibration": calibration} if sweep.calibration != CalibrationConfig() else {}
    models = model_fields(sweep)
    for model, targets, ratio, spec, seed in itertools.product(
        sweep.models, sweep.targets, sweep.ratios, sweep.methods, sweep.seeds
    ):
        if (spec.targets is not None and targets not in spec.targets) or (
            spec.ratios is not None and ratio not in spec.ratios
        ):
            continue
        for group in spec.groups or sweep.groups:
            yield {
                **models[model],
                "label": spec.name,
                "method": spec.method,
                "options": spec.options,
                "targets": targets,
                "group": group,
                "ratio": ratio,
                "seed": seed,
                **({"recipe": spec.recipe} if spec.recipe else {}),
                **custom,
            }


def model_fields(sweep: SweepRecipe) -> dict[str, dict[str, str]]:
    """Each model's fields in its cells: its name as written and, for a local folder or
    file, `model_id` (absolute path and weights sha256): a relative path run from another
    folder, or a folder whose weights changed, is another model with other cells."""
    fields = {}
    for model in sweep.models:
        identity = model_identity(model)
        fields[model] = {"model": model, **({"model_id": identity} if identity else {})}
    return fields


def cell_model(cell: dict[str, Any]) -> str:
    """What a cell's model loads from: a local model's absolute path (a worker may run in
    another folder than the sweep), else its name."""
    identity = cell.get("model_id")
    return identity.rpartition("@")[0] if identity else cell["model"]


def cell_id(cell: dict[str, Any]) -> str:
    """A cell's identity in the results file: its fields as JSON, keys sorted."""
    return json.dumps(cell, sort_keys=True)


def cell_key(cell: dict[str, Any], task: str, settings: dict[str, Any] | None) -> str:
    """One task of one cell with its settings: what a re-run skips when recorded as ok."""
    return cell_id({**cell, "task": task, "settings": settings})


def record_key(record: dict[str, Any]) -> str:
    """cell_key of a record (failures written before settings were recorded have none)."""
    return cell_key(record["cell"], record["task"], record.get("settings"))


_SLOT_FIELDS = ("model", "model_id", "label", "targets", "group", "ratio", "seed")


def current(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest record of each measurement (model, label, targets, group, ratio, seed,
    task and its settings but the batch size), in order of first appearance: a re-run
    supersedes earlier records; a task run with other settings (windows, split, its own
    seed) is another measurement."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        settings = {k: v for k, v in (record.get("settings") or {}).items() if k != "batch_size"}
        slot = [record["cell"].get(f) for f in _SLOT_FIELDS] + [record["task"], settings]
        latest[json.dumps(slot, sort_keys=True)] = record
    return list(latest.values())


class _CellFields(BaseModel):
    """What the sweep and its report read of a record's cell (a dense cell has no more)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    label: str
    ratio: float
    targets: str = ""
    group: str = "none"
    seed: int = 0


class _RecordFields(BaseModel):
    """What the sweep and its report read of a record: a line of any other form (edited,
    or from another tool) is not a record."""

    model_config = ConfigDict(extra="allow", strict=True)

    cell: _CellFields
    task: str
    status: Literal["ok", "failed"]
    metrics: dict[str, float] | None = None
    error: str = ""
    settings: dict[str, Any] | None = None
    split: str = ""
    seconds: float = 0.0
    compress_seconds: float = 0.0
    ratio: float = 1.0

    @model_validator(mode="after")
    def _ok_has_metrics(self) -> _RecordFields:
        if self.status == "ok" and self.metrics is None:
            raise ValueError("an ok record has metrics")
        return self


_NOT_A_RECORD: dict[str, Any] = {}  # what _parse returns for a whole line of another form


def _parse(line: str) -> dict[str, Any] | None:
    """A record, also when glued onto a torn line that an interrupted writer left; None for
    a torn line, _NOT_A_RECORD for JSON that is not a record."""
    for start in [0, *(match.start() for match in re.finditer(r'(?<=.)\{"cell"', line))]:
        try:
            record = json.loads(line[start:])
        except (ValueError, RecursionError):  # torn, or nested too deep
            continue
        try:
            _RecordFields.model_validate(record)
        except ValidationError:
            return _NOT_A_RECORD
        return record
    return None


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records of a results file; torn lines (interrupted writes) are skipped, and so are
    lines of another form (with a warning)."""
    if not path.is_file():
        return []
    parsed = [_parse(line) for line in path.read_text().splitlines()]
    if skipped := sum(1 for record in parsed if record is _NOT_A_RECORD):
        logger.warning("%s: skipping %d line(s) that are not sweep records", path, skipped)
    return [record for record in parsed if record is not None and record is not _NOT_A_RECORD]


_RECORD_START = '{"cell"'  # of every line written (keys sorted), torn lines included


def is_results_file(path: Path) -> bool:
    """Whether every line of `path` is a record (or a torn one): a results file of ours."""
    with path.open(errors="replace") as handle:
        continued = False  # the line goes on from the last piece read
        for piece in iter(lambda: handle.readline(1 << 16), ""):
            start = piece[: len(_RECORD_START)].rstrip("\n")
            if not continued and not _RECORD_START.startswith(start):
                return False
            continued = not piece.endswith("\n")
    return True


def _append(path: Path, record: dict[str, Any]) -> None:
    """Append one line in one write, after ending a torn last line if there is one."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    handle = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(handle).st_size
        if size and os.pread(handle, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(handle, data)
    finally:
        os.close(handle)


def _tasks_for(sweep: SweepRecipe, cell: dict[str, Any]) -> list[TaskSpec]:
    """The tasks of a cell: every task for the dense model's, else those it is not excluded
    from by their ratios, labels and targets; a task with the settings of an earlier one
    once (the same task may be listed for different cells)."""
    chosen = [t for t in sweep.tasks if "method" not in cell or t.runs_on(cell)]
    unique: dict[str, TaskSpec] = {}  # by the key a record of it has (cell_key)
    for spec in chosen:
        unique.setdefault(cell_key(cell, spec.task, _settings(spec)), spec)
    return list(unique.values())


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N: this process runs every N-th cell from the I-th."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise AecompressError(f"shard must be I/N with 0 <= I < N (got '{text}')")
    return int(index), int(count)


def _settings(spec: TaskSpec) -> dict[str, Any]:
    return task_settings(spec.task, spec.options)


@dataclass
class ResultsLog:
    """The results file, and what the latest records say about each cell, task, settings."""

    path: Path
    done: set[str] = field(default_factory=set)  # recorded as ok
    failed: dict[str, str] = field(default_factory=dict)  # key -> error of its failure

    @classmethod
    def read(cls, path: Path) -> ResultsLog:
        log = cls(path)
        for record in current(read_results(path)):
            if record.get("status") == "ok":
                log.done.add(record_key(record))
            else:
                log.failed[record_key(record)] = record.get("error", "")
        return log

    def pending(self, cell: dict[str, Any], specs: list[TaskSpec]) -> list[TaskSpec]:
        """The tasks of specs not yet recorded ok for the cell with their settings."""
        return [s for s in specs if cell_key(cell, s.task, _settings(s)) not in self.done]

    def write(self, record: dict[str, Any]) -> None:
        """Append a record, unless it is a failure the same as the cell's last (a re-run)."""
        if record["status"] == "ok" or self.failed.get(record_key(record)) != record["error"]:
            _append(self.path, record)


def failure_record(cell: dict[str, Any], spec: TaskSpec, error: BaseException) -> dict[str, Any]:
    """The record of a task that failed with `error` (call it while handling the error)."""
    return {
        "cell": cell,
        "task": spec.task,
        "settings": _settings(spec),
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(limit=5),
    }


@dataclass(frozen=True)
class Job:
    """A cell (or a model's dense cell, labelled dense) and its tasks not yet recorded ok."""

    cell: dict[str, Any]
    tasks: list[TaskSpec]


Record = Callable[[dict[str, Any]], None]
# An executor runs every job and passes each record, as it comes, to the driver's writer.
Executor = Callable[[SweepRecipe, list[Job], Record], None]


def run_sweep(
    sweep: SweepRecipe,
    results: Path,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """Run every cell whose latest record in `results` is not an ok one with the recipe's
    settings (failures are retried); returns all records.

    With shard (I, N), only every N-th cell from the I-th (and the dense model only in
    shard 0): N processes with the same results file share the grid between them. The
    executor (default: this process, one job after the other) runs the jobs; only this
    process writes the results file.
    """
    # unknown tasks and task options failed when the recipe was read; unknown methods,
    # options, targets and bad ratios fail here, before any work
    for cell in cells(sweep):
        cell_recipe(sweep, cell)
    results.parent.mkdir(parents=True, exist_ok=True)
    log = ResultsLog.read(results)
    run = executor or partial(run_serially, progress=progress)
    run(sweep, pending_jobs(sweep, log, shard), log.write)
    return read_results(results)


def cell_recipe(sweep: SweepRecipe, cell: dict[str, Any]) -> Recipe:
    """The compression recipe of a cell (a one-line error naming the cell if invalid)."""
    names = ("model", "method", "options", "ratio", "targets", "group", "seed")
    fields = {name: cell[name] for name in names}
    try:
        return Recipe.parse({**fields, "calibration": sweep.calibration, **cell.get("recipe", {})})
    except AecompressError as error:
        where = f"{cell['label']}, targets {cell['targets']}, ratio {cell['ratio']}"
        raise AecompressError(f"sweep cell {where}: {error}") from error


def pending_jobs(sweep: SweepRecipe, log: ResultsLog, shard: tuple[int, int]) -> list[Job]:
    """The shard's dense cells and cells, in grid order, with their tasks not yet done."""
    index, count = shard
    models = model_fields(sweep).values()
    dense = [{**m, "label": "dense", "ratio": 1.0} for m in models if index == 0]
    jobs = [Job(cell, log.pending(cell, _tasks_for(sweep, cell))) for cell in dense]
    jobs += [
        Job(cell, log.pending(cell, _tasks_for(sweep, cell)))
        for number, cell in enumerate(cells(sweep))
        if number % count == index
    ]
    return [job for job in jobs if job.tasks]


def run_serially(sweep: SweepRecipe, jobs: list[Job], record: Record, progress: bool) -> None:
    """Run the jobs in this process; each model is loaded once."""
    dense_models: dict[str, LoadedModel] = {}
    for job in jobs:
        name = cell_model(job.cell)
        dense = dense_models[name] = dense_models.get(name) or load_model(name)
        run_job(sweep, job, dense, record, progress)


def run_job(
    sweep: SweepRecipe, job: Job, dense: LoadedModel, record: Record, progress: bool
) -> None:
    """Compress (unless the cell is dense) and run each task; a failure becomes a record."""
    if "method" not in job.cell:  # the dense model's cell
        for spec in job.tasks:
            _run_and_record(record, job.cell, dense, dense, spec, {"compress_seconds": 0.0})
        return
    start = time.perf_counter()
    try:
        recipe = cell_recipe(sweep, job.cell)
        fresh = LoadedModel(
            copy.deepcopy(dense.model), dense.tokenizer, dense.source, dense.auto_class
        )
        compressed = compress(fresh, recipe, progress=progress)
    except Exception as error:  # a failing cell is recorded, the sweep goes on
        for spec in job.tasks:
            record(failure_record(job.cell, spec, error))
        return
    extra = {"compress_seconds": time.perf_counter() - start, **compressed.totals()}
    loaded = LoadedModel(compressed.model, dense.tokenizer, dense.source, dense.auto_class)
    for spec in job.tasks:
        _run_and_record(record, job.cell, loaded, dense, spec, extra)


def _run_and_record(
    record: Record,
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
        record(failure_record(cell, spec, error))
        return
    record({"cell": cell, "status": "ok", **extra, **asdict(result), "environment": environment()})
