"""Issue 10's compensation benchmark, the rows a sweep cannot run: llm-compressor's one-shot
SparseGPT and Wanda, the external reference, on the cells of a compensation recipe.

The benchmark's own grid is recipes/smollm2-compensation.yaml (MLPs) and
smollm2-compensation-linear.yaml (all linear layers), run by `aecompress sweep`.
llm-compressor is no aecompress method: a library that pins its own transformers, run
under a Python that has it installed beside aecompress (an optional extra, never a
dependency). This script takes the recipe's model, targets, ratios, calibration windows
and tasks; prunes the targets with each llm-compressor modifier at the sparsity whose kept
values and positions, counted as aecompress counts a sparsegpt cell, fill the stored size
of the ratio; evaluates the recipe's tasks (those restricted to some labels, the zero-shot
ones, only for the rows marked so) and appends sweep records (labels llmcompressor:*) to
the recipe's results file, so `aecompress report` tables them beside the recipe's rows.
Resumable as a sweep: a task already recorded ok with the same settings is not run again.

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 && \\
        /tmp/llmc/bin/pip install llmcompressor -e '.[models]'
    /tmp/llmc/bin/python benchmarks/compensation.py \\
        --results benchmarks/results/smollm2-compensation/results.jsonl
    /tmp/llmc/bin/python benchmarks/compensation.py --quick --results /tmp/c.jsonl  # smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import Stopwatch, fresh_copy

from aecompress.calibration import CalibrationConfig, calibration_windows
from aecompress.evaluation.tasks import run_task, task_settings
from aecompress.models import LoadedModel, load_model
from aecompress.pipeline.plan import PlannedGroup, plan_groups
from aecompress.recipe import Recipe
from aecompress.sweep import (
    SweepRecipe,
    TaskSpec,
    cell_key,
    current,
    failure_record,
    read_results,
    record_key,
)
from aecompress.targets import weight_matrix

RECIPE = Path(__file__).parent / "recipes" / "smollm2-compensation.yaml"


@dataclass(frozen=True)
class Reference:
    """One llm-compressor row: its modifier, and whether it runs the zero-shot tasks."""

    label: str
    modifier: str
    zero_shot: bool = False


REFERENCES = [
    Reference("llmcompressor:sparsegpt", "SparseGPTModifier", zero_shot=True),
    Reference("llmcompressor:wanda", "WandaPruningModifier"),
]
# Prunes the model's `paths` in place at `sparsity`, calibrated on `windows` [n, seq_len].
Pruner = Callable[[LoadedModel, str, list[str], float, torch.Tensor], None]


def llmcompressor_prune(
    loaded: LoadedModel, modifier: str, paths: list[str], sparsity: float, windows: torch.Tensor
) -> None:
    """llm-compressor's one-shot `modifier` (its default, sequential pipeline)."""
    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning

    data = datasets.Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    pattern = "re:^(" + "|".join(re.escape(path) for path in paths) + ")$"
    recipe = getattr(pruning, modifier)(sparsity=sparsity, targets=[pattern], ignore=["lm_head"])
    oneshot(
        model=loaded.model,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=windows.shape[0],
        max_seq_length=windows.shape[1],
        shuffle_calibration_samples=False,
    )


def kept_within_budget(planned: PlannedGroup) -> int:
    """The most weights the group (one matrix: grouping none) keeps within its budget,
    values and positions counted as the sparsegpt method counts them."""
    low, high = 0, planned.spec.rows * planned.spec.cols
    while low < high:
        middle = (low + high + 1) // 2
        if planned.method.cost(middle, planned.spec) <= planned.budget:
            low = middle
        else:
            high = middle - 1
    return low


def stored_ratio(model: torch.nn.Module, planned: list[PlannedGroup]) -> float:
    """Dense bits over stored bits of the pruned targets, counted from their nonzeros."""
    stored = sum(
        g.method.cost(int(weight_matrix(model, g.group.members[0]).count_nonzero()), g.spec)
        for g in planned
    )
    return sum(g.spec.dense_bits for g in planned) / stored


def tasks_of(sweep: SweepRecipe, row: Reference, quick: bool) -> list[TaskSpec]:
    """The recipe's tasks a row runs (quick: its WikiText-2 ones on one window of 32 tokens)."""
    if quick:
        update = {"windows": 1, "seq_len": 32}
        wikitext = [t for t in sweep.tasks if t.task == "wikitext2"]
        return [t.model_copy(update={"options": {**t.options, **update}}) for t in wikitext]
    return [t for t in sweep.tasks if t.labels is None or row.zero_shot]


def cells(
    sweep: SweepRecipe, args: argparse.Namespace
) -> Iterator[tuple[dict[str, Any], list[TaskSpec]]]:
    """Each reference row's cells of the recipe, with the tasks it runs; a calibration other
    than the default is part of the cell, as in a sweep's."""
    calibration = args.calibration.model_dump()
    custom = {"calibration": calibration} if args.calibration != CalibrationConfig() else {}
    for targets in sweep.targets:
        for ratio in args.ratios or sweep.ratios:
            for row in args.references:
                cell = {
                    "model": args.model or sweep.models[0],
                    "label": row.label,
                    "method": f"llmcompressor:{row.modifier}",
                    "targets": targets,
                    "group": "none",
                    "ratio": ratio,
                    "seed": 0,
                    **custom,
                }
                yield cell, tasks_of(sweep, row, args.quick)


def run_cell(
    dense: LoadedModel,
    cell: dict[str, Any],
    tasks: list[TaskSpec],
    calibration: CalibrationConfig,
    prune: Pruner,
) -> Iterator[dict[str, Any]]:
    """Prune a copy of the dense model, then run each task: one record each."""
    recipe = Recipe.parse(
        {"method": "sparsegpt", "ratio": cell["ratio"], "targets": cell["targets"]}
    )
    loaded = fresh_copy(dense)
    clock = Stopwatch()
    try:
        planned = plan_groups(loaded.model, recipe)
        numel = sum(g.spec.rows * g.spec.cols for g in planned)
        sparsity = 1 - sum(kept_within_budget(g) for g in planned) / numel
        paths = [g.group.members[0].path for g in planned]
        assert loaded.tokenizer is not None
        windows = calibration_windows(loaded.tokenizer, calibration)
        prune(loaded, cell["method"].removeprefix("llmcompressor:"), paths, sparsity, windows)
        extra = {"compress_seconds": clock.seconds(), "ratio": stored_ratio(loaded.model, planned)}
    except Exception as error:  # recorded, as a sweep records a failing cell
        yield from (failure_record(cell, spec, error) for spec in tasks)
        return
    for spec in tasks:
        try:
            result = run_task(
                spec.task, loaded.model, loaded.tokenizer, progress=False, **spec.options
            )
        except Exception as error:
            yield failure_record(cell, spec, error)
            continue
        yield {"cell": cell, "status": "ok", **extra, **asdict(result)}


def run(args: argparse.Namespace, prune: Pruner = llmcompressor_prune) -> None:
    sweep = SweepRecipe.from_yaml(args.recipe)
    done = {record_key(r) for r in current(read_results(args.results)) if r["status"] == "ok"}
    dense: LoadedModel | None = None
    for cell, tasks in cells(sweep, args):
        pending = [
            t for t in tasks if cell_key(cell, t.task, task_settings(t.task, t.options)) not in done
        ]
        if not pending:
            continue
        dense = dense or load_model(cell["model"])
        for record in run_cell(dense, cell, pending, args.calibration, prune):
            append(args.results, record)
            shown = record.get("metrics", record.get("error"))
            print(f"{cell['label']} {cell['targets']} {cell['ratio']} {record['task']}: {shown}")


def append(path: Path, record: dict[str, Any]) -> None:
    """One line of the results file, keys sorted as the sweep writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="a compensation recipe")
    parser.add_argument("--results", type=Path, required=True, help="the recipe's results file")
    parser.add_argument("--ratios", type=float, nargs="+", help="default: the recipe's")
    parser.add_argument("--rows", nargs="+", default=[r.label for r in REFERENCES])
    parser.add_argument("--model", help="default: the recipe's (a local folder for tests)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: the first ratio, SparseGPT only, 4 calibration windows of 32 "
        "tokens, one WikiText-2 window of 32 tokens per task, no zero-shot",
    )
    args = parser.parse_args(argv)
    unknown = set(args.rows) - {r.label for r in REFERENCES}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}: use {[r.label for r in REFERENCES]}")
    args.references = [r for r in REFERENCES if r.label in args.rows]
    args.calibration = SweepRecipe.from_yaml(args.recipe).calibration
    if args.quick:
        args.ratios = (args.ratios or SweepRecipe.from_yaml(args.recipe).ratios)[:1]
        args.references = args.references[:1]
        args.calibration = CalibrationConfig(samples=4, seq_len=32, batch_size=4)
    return args


def main() -> None:
    args = parse_args()
    if importlib.util.find_spec("llmcompressor") is None:
        print(
            "compensation.py: error: llmcompressor is not installed in this Python "
            f"({sys.executable}); see this script's docstring",
            file=sys.stderr,
        )
        raise SystemExit(2)
    run(args)


if __name__ == "__main__":
    main()
