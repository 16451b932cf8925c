"""Evaluate a model or an artifact, and the artifact's dense base model in the same run."""

from __future__ import annotations

import time
from typing import Any

from aecompress.artifact import is_artifact, load_compressed
from aecompress.data import WIKITEXT2_FILES, data_file, file_sha256
from aecompress.errors import AecompressError
from aecompress.evaluate.perplexity import perplexity
from aecompress.models import LoadedModel, load_model

TASK_NAMES = ("wikitext2",)


def run_task(loaded: LoadedModel, task: str, options: dict[str, Any]) -> dict[str, Any]:
    """One task on one model: a JSON-ready record with metric, split, settings, wall time."""
    if task not in TASK_NAMES:
        raise AecompressError(f"unknown task '{task}': use {', '.join(TASK_NAMES)}")
    if loaded.tokenizer is None:
        raise AecompressError(f"{loaded.source} has no tokenizer: cannot evaluate")
    start = time.perf_counter()
    result = perplexity(
        loaded.model,
        loaded.tokenizer,
        split=options.get("split", "test"),
        seq_len=options.get("seq_len", 512),
        windows=options.get("windows"),
    )
    return {
        "task": task,
        "metric": "perplexity",
        "value": result.perplexity,
        "split": result.split,
        "settings": {"seq_len": result.seq_len, "windows": result.windows, "tokens": result.tokens},
        "data_sha256": file_sha256(data_file(WIKITEXT2_FILES[result.split])),
        "seconds": time.perf_counter() - start,
    }


def evaluate(
    model: str, tasks: list[str], options: dict[str, Any], dense: bool = True
) -> list[dict[str, Any]]:
    """Run `tasks` on a model or an artifact; with `dense`, on the artifact's base model too."""
    for task in tasks:
        if task not in TASK_NAMES:
            raise AecompressError(f"unknown task '{task}': use {', '.join(TASK_NAMES)}")
    runs: list[tuple[str, LoadedModel]] = []
    if is_artifact(model):
        compressed = load_compressed(model)
        if dense:
            runs.append(("dense", load_model(compressed.base_model, compressed.auto_class)))
        loaded = LoadedModel(compressed.model, compressed.tokenizer, model, compressed.auto_class)
        runs.append(("compressed", loaded))
    else:
        runs.append(("dense", load_model(model)))
    results = []
    for role, loaded in runs:
        for task in tasks:
            record = run_task(loaded, task, options)
            results.append({"model": loaded.source, "role": role, **record})
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per task and metric, dense beside compressed with the difference."""
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in results:
        rows.setdefault((r["task"], r["metric"], r["split"]), {})[r["role"]] = r["value"]
    lines = [
        "| task | metric | split | dense | compressed | difference |",
        "|---|---|---|---|---|---|",
    ]
    for (task, metric, split), values in rows.items():
        dense, comp = values.get("dense"), values.get("compressed")
        diff = f"{comp - dense:+.4g}" if dense is not None and comp is not None else ""
        cells = [f"{v:.4g}" if v is not None else "" for v in (dense, comp)]
        lines.append(f"| {task} | {metric} | {split} | {cells[0]} | {cells[1]} | {diff} |")
    return "\n".join(lines)
