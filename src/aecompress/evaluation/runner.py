"""Evaluate a model or an artifact, beside the artifact's dense base model (cached)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import ValidationError
from torch import nn

from aecompress.artifact import is_artifact, load_compressed, read_manifest
from aecompress.cache import InvalidEntry, cache_dir, read_entry, write_entry
from aecompress.data import data_dir, data_file, file_sha256
from aecompress.errors import AecompressError, describe
from aecompress.evaluation.common import Forward
from aecompress.evaluation.results import TaskResult
from aecompress.evaluation.streamed import choose_streaming, open_streamed, whole_bytes
from aecompress.evaluation.tasks import TASKS, check_task, known_task, run_task
from aecompress.evaluation.tasks.glue import probe_tasks
from aecompress.models import LoadedModel, load_model, resolve_device, weights_sha256
from aecompress.streaming import BlockSource, CheckpointBlocks, checkpoint_sha256

CPU = torch.device("cpu")


@dataclass
class StreamedLoaded(LoadedModel):
    """A model evaluated block by block: `model` is its skeleton, `forward` its logits,
    `blocks` where its blocks are read from."""

    forward: Forward | None = None
    blocks: BlockSource | None = None


def _forward(loaded: LoadedModel) -> Forward | None:
    """The streamed logits of `loaded` (None: it is in memory)."""
    return loaded.forward if isinstance(loaded, StreamedLoaded) else None


def task_options(task: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of `options` that `task` accepts (options given for several tasks reach
    only the tasks that take them)."""
    accepted = TASKS[task].Options.model_fields
    return {k: v for k, v in options.items() if k in accepted}


def _check_options(tasks: list[str], options: dict[str, Any]) -> None:
    """A one-line error for an option no task takes, or a value a task refuses."""
    accepted = set().union(*(TASKS[t].Options.model_fields for t in tasks))
    unused = sorted(str(k) for k in options if k not in accepted)
    if unused:
        raise AecompressError(f"no task of {', '.join(tasks)} takes the option {', '.join(unused)}")
    for task in tasks:
        TASKS[task].settings(task_options(task, options))


def _dense_cache(base_sha256: str, task: str, options: dict[str, Any], device: str) -> Path:
    fields = {"weights": base_sha256, "task": task, "options": options}
    if device != "cpu":  # another device's kernels may round differently
        fields["device"] = device
    key = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir() / "dense" / f"{digest}.json"


def cached_dense_result(
    load_dense: Any,
    base_sha256: str,
    task: str,
    options: dict[str, Any],
    progress: bool,
    device: str = "cpu",
) -> TaskResult:
    """The dense model's result, measured once per weights, task, options, device type (and
    data hashes).

    `load_dense()` returns the dense LoadedModel (on the device, or a StreamedLoaded); it
    is called only on a cache miss.
    """
    path = _dense_cache(base_sha256, task, options, device)
    cached = read_entry(path, lambda p: _read_dense_entry(p, task))
    if cached is not None:
        current = {f: file_sha256(data_file(f)) for f in cached.data_sha256}
        if current == cached.data_sha256:  # the data files are unchanged
            return cached
    dense: LoadedModel = load_dense()
    result = run_task(
        task, dense.model, dense.tokenizer, progress=progress, forward=_forward(dense), **options
    )
    write_entry(path, lambda p: p.write_text(result.to_json()))
    return result


def _read_dense_entry(path: Path, task: str) -> TaskResult:
    """A dense cache entry: a result of `task` whose data files exist; else InvalidEntry."""
    try:
        result = TaskResult.from_json(path.read_text())
    except ValidationError as error:
        raise InvalidEntry(describe(error, "its result")) from error
    except json.JSONDecodeError:
        raise  # unreadable: the cache says so itself
    except ValueError as error:  # another form: an older version's
        raise InvalidEntry(str(error)) from error
    if result.task != task:
        raise InvalidEntry(f"it holds a result of {result.task}, not {task}")
    folder = data_dir().resolve()
    for name in result.data_sha256:
        if not (folder / name).resolve().is_relative_to(folder) or not (folder / name).is_file():
            raise InvalidEntry(f"its data file {name} is not in {folder}")
    return result


def load_base_model(
    artifact: str,
    manifest: dict[str, Any],
    stream: bool = False,
    device: torch.device = CPU,
    progress: bool = False,
) -> LoadedModel:
    """The artifact's base model (in memory, or with `stream` a StreamedLoaded on `device`),
    refused unless its weights are the ones it was made from."""
    name = manifest["base_model"]
    if not name:
        raise AecompressError(
            f"{artifact} records no base model (it was compressed from a model object): "
            "use --no-dense"
        )
    try:
        base = _load(name, stream, device, progress, manifest["auto_class"])
    except AecompressError as error:
        raise AecompressError(
            f"the base model of {artifact}: {error} (restore it, or use --no-dense)"
        ) from error
    if _weights_sha256(base) != manifest["base_weights_sha256"]:
        raise AecompressError(
            f"base model '{name}' does not hold the weights {artifact} was compressed from "
            "(sha256 differs; a relative path is read from the current folder): "
            "restore it, or use --no-dense"
        )
    return base


def load_evaluated(model: str, decode: bool = False) -> LoadedModel:
    """What `evaluate` runs: an artifact folder's compressed model (`decode`: every matrix
    decoded), else the model (a name, folder or .gguf) itself."""
    if not is_artifact(model):
        return load_model(model)
    compressed = load_compressed(model, decode=decode)
    return LoadedModel(compressed.model, compressed.tokenizer, model, compressed.auto_class)


def _on(device: torch.device, loaded: LoadedModel) -> LoadedModel:
    """`loaded` with its model moved to `device`."""
    cast(nn.Module, loaded.model).to(device)
    return loaded


def _load(
    model: str,
    stream: bool,
    device: torch.device,
    progress: bool,
    auto_class: str | None = None,
) -> LoadedModel:
    """`model` (as load_evaluated takes it) on `device`: in memory, or with `stream` its
    skeleton and the forward that streams its blocks there (`auto_class`: the class a plain
    model is loaded as)."""
    if not stream:
        if auto_class is not None and not is_artifact(model):
            return _on(device, load_model(model, auto_class))
        return _on(device, load_evaluated(model))
    opened = open_streamed(model, device, progress, auto_class)
    return StreamedLoaded(
        opened.model, opened.tokenizer, model, opened.auto_class, opened.forward, opened.source
    )


def _weights_sha256(loaded: LoadedModel) -> str:
    """models.weights_sha256 of the model, a tensor at a time when it is streamed."""
    if isinstance(loaded, StreamedLoaded) and isinstance(loaded.blocks, CheckpointBlocks):
        return checkpoint_sha256(loaded.blocks)
    return weights_sha256(loaded.model)


def evaluate(
    model: str,
    tasks: list[str],
    options: dict[str, Any] | None = None,
    *,
    dense: bool = True,
    probe: bool = False,
    progress: bool = True,
    device: str = "auto",
    stream: bool | None = None,
) -> tuple[list[TaskResult], list[TaskResult]]:
    """Run `tasks` on a model (name, folder, .gguf) or an artifact folder, with `options`
    (each reaches the tasks that take it), on `device` (auto: CUDA when there is one).
    `stream`: evaluate block by block, one block's weights on the device at a time (True),
    never (False), or when the model loaded whole would not fit the memory (None); the
    base model of an artifact streams too when it can (a safetensors folder).

    Returns (results, dense_results). For an artifact, dense_results are those of its base
    model (cached per base weights, task and options; empty with dense=False); for a plain
    model, results are its own and dense_results is empty. With `probe`, each GLUE task
    `glue-X` runs as its frozen-feature probe `glue-X-probe` (and is reported so).
    """
    options = options or {}
    if probe:
        tasks = probe_tasks(tasks)
    for task in tasks:
        known_task(task)
    _check_options(tasks, options)
    where = resolve_device(device)
    streamed = choose_streaming(model, tasks, stream)
    if not is_artifact(model):
        loaded = _load(model, streamed, where, progress)
        return [_run(loaded, t, options, None, progress) for t in tasks], []
    manifest = read_manifest(model)
    dense_results = (
        _dense_results(model, manifest, tasks, options, progress, where, stream) if dense else []
    )
    loaded = _load(model, streamed, where, progress)  # the base model is freed: one at a time
    results = []
    for task in tasks:
        check_task(task, loaded.model)
        # a task that compares with the dense model holds both
        needs_base = TASKS[task].needs_reference
        reference = _on(where, load_base_model(model, manifest)) if needs_base else None
        results.append(_run(loaded, task, options, reference, progress))
    return results, dense_results


def _dense_results(
    artifact: str,
    manifest: dict[str, Any],
    tasks: list[str],
    options: dict[str, Any],
    progress: bool,
    device: torch.device,
    stream: bool | None,
) -> list[TaskResult]:
    """The base model's results of the tasks that do not compare with it (cached); the base
    model is loaded at most once, and freed when this returns. It streams as `stream`
    says (see evaluate), and with `stream` True only when it can (else it is loaded whole)."""
    base: list[LoadedModel] = []
    dense_tasks = [task for task in tasks if not TASKS[task].needs_reference]

    def load_base() -> LoadedModel:
        if not base:
            name = manifest["base_model"] or ""
            can = stream is not True or whole_bytes(name) is not None
            streamed = can and choose_streaming(name, dense_tasks, stream)
            base.append(load_base_model(artifact, manifest, streamed, device, progress))
        return base[0]

    sha256 = manifest["base_weights_sha256"]
    return [
        cached_dense_result(
            load_base, sha256, task, task_options(task, options), progress, device.type
        )
        for task in dense_tasks
    ]


def _run(
    loaded: LoadedModel,
    task: str,
    options: dict[str, Any],
    reference: LoadedModel | None,
    progress: bool,
) -> TaskResult:
    return run_task(
        task,
        loaded.model,
        loaded.tokenizer,
        reference=reference.model if reference else None,
        progress=progress,
        forward=_forward(loaded),
        **task_options(task, options),
    )
