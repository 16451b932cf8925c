"""Time evaluation tasks on one model: one JSON line per result, then a Markdown table.

CPU time near threads x wall time means the run had the cores to itself.

    python benchmarks/evaluate_tasks.py MODEL TASK[:key=value,...] ... [--auto-class CLASS]

e.g. `python benchmarks/evaluate_tasks.py minilm-l6 stsb glue-mrpc:train_fraction=0.1`.
Option values are read as JSON when they parse (numbers, true/false, null), else as text.
`--quick` (a smoke test) runs each task on one window of 32 tokens or its first 4 items,
for the tasks that have those options.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from common import Stopwatch

from aecompress.errors import AecompressError
from aecompress.evaluation.results import format_table
from aecompress.evaluation.tasks import run_task, task_settings
from aecompress.models import load_model

QUICK = {"windows": 1, "seq_len": 32, "limit": 4}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _task(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, options = spec.partition(":")
    pairs = (item.split("=", 1) for item in options.split(",") if item)
    return name, {key: _value(value) for key, value in pairs}


def quick_options(name: str) -> dict[str, Any]:
    """The QUICK options task `name` has."""
    found = {}
    for key, value in QUICK.items():
        try:
            task_settings(name, {key: value})
        except AecompressError:
            continue
        found[key] = value
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("tasks", nargs="+", help="TASK or TASK:key=value,key=value")
    parser.add_argument("--auto-class", default=None, help="e.g. AutoModelForCausalLM")
    parser.add_argument("--quick", action="store_true", help="smoke test (see above)")
    args = parser.parse_args()
    clock = Stopwatch()
    loaded = load_model(args.model, auto_class=args.auto_class)
    print(
        f"# loaded {args.model} as {type(loaded.model).__name__} in "
        f"{clock.seconds():.1f} s, {torch.get_num_threads()} threads",
        flush=True,
    )
    results = []
    for spec in args.tasks:
        name, options = _task(spec)
        if args.quick:
            options = quick_options(name) | options
        cpu = time.process_time()
        result = run_task(name, loaded.model, loaded.tokenizer, reference=loaded.model, **options)
        print(f"# {name}: {result.seconds:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")
        print(result.to_json(), flush=True)
        results.append(result)
    print(format_table(results))


if __name__ == "__main__":
    main()
