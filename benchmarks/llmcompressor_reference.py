"""llm-compressor's one-shot GPTQ and round-to-nearest beside aecompress's gptq / rtn (issue 27).

The same model, targets (SmolLM2-135M's MLPs: up, gate, down, or `--targets` such as
q,k,v,o,up,gate,down for every linear layer of its blocks), calibration windows
(aecompress's loader: 64 x 256 WikiText-2 train tokens) and evaluation (the sweep recipe's
tasks, scored by aecompress's own evaluation on the same windows) as the quantization sweep;
symmetric integer weights with one scale per group of 64 columns, GPTQ with damping 0.01,
blocks of 128 and static activation order, as aecompress's gptq defaults. The scales are
fp32 here (the model is evaluated in fp32; aecompress stores bf16 scales), and the stored
ratio is counted from the shapes in compressed-tensors' pack-quantized form with bf16
scales, as aecompress counts its own. Each configuration runs in its own process; each of
its records (wall time of the process and its peak RSS until that task was done,
`compress_seconds`: the oneshot call) is appended to the sweep's results file when done,
so `aecompress report` puts them beside the sweep's rows. A configuration whose tasks are
all recorded ok is skipped.

llmcompressor pins an older transformers than aecompress's venv, so this runs under the
venv of `make llmcompressor`:

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv-llmcompressor/bin/python \\
        benchmarks/llmcompressor_reference.py benchmarks/recipes/quantization.yaml \\
        --results benchmarks/results/quantization/results.jsonl

The frontier benchmark (issue 28) runs it the same way on benchmarks/recipes/frontier.yaml
into benchmarks/results/frontier/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
MLPS = "up,gate,down"  # of SmolLM2-135M (the recipe's model), run from a plain fp32 copy
# label -> (modifier, bits, group, the sweep's ratio column of that scheme: the largest
# ratio it fits within; at 1/6 of bf16 that is w2's, measured at 1/7.1)
CONFIGS: dict[str, tuple[str, int, int, float]] = {
    "llm-compressor gptq g64 w7": ("GPTQModifier", 7, 64, 2.0),
    "llm-compressor rtn g64 w7": ("QuantizationModifier", 7, 64, 2.0),
    "llm-compressor gptq g64 w5": ("GPTQModifier", 5, 64, 3.0),
    "llm-compressor rtn g64 w5": ("QuantizationModifier", 5, 64, 3.0),
    "llm-compressor gptq g64 w4": ("GPTQModifier", 4, 64, 3.76),
    "llm-compressor rtn g64 w4": ("QuantizationModifier", 4, 64, 3.76),
    "llm-compressor gptq g64 w3": ("GPTQModifier", 3, 64, 4.92),
    "llm-compressor rtn g64 w3": ("QuantizationModifier", 3, 64, 4.92),
    "llm-compressor gptq g64 w2": ("GPTQModifier", 2, 64, 7.1),
    "llm-compressor rtn g64 w2": ("QuantizationModifier", 2, 64, 7.1),
}


def cell_of(name: str, model: str, targets: str) -> dict[str, Any]:
    """The cell of a configuration, as the sweep's cells read (label without the bits:
    the ratio column says them)."""
    modifier, bits, group, ratio = CONFIGS[name]
    options: dict[str, Any] = {"bits": bits, "group": group, "symmetric": True}
    if modifier == "GPTQModifier":
        options |= {"dampening_frac": 0.01, "block_size": 128, "actorder": "static"}
    return {
        "model": model,
        "label": name.rsplit(" ", 1)[0],
        "method": f"llmcompressor:{modifier}",
        "options": options,
        "targets": targets,
        "group": "none",
        "ratio": ratio,
        "seed": 0,
    }


def quantize(loaded: Any, targets: str, modifier: str, bits: int, group: int) -> list[str]:
    """Quantize the targets in place with llm-compressor's one-shot `modifier`, calibrated
    on aecompress's calibration windows; returns the quantized modules' paths."""
    import datasets
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from aecompress.calibration import CalibrationConfig, calibration_windows
    from aecompress.targets import resolve_targets

    paths = [t.path for t in resolve_targets(loaded.model, targets.split(","))]
    weights: dict[str, Any] = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group,
    }
    pattern = "re:^(" + "|".join(map(re.escape, paths)) + ")$"
    scheme = {"group_0": {"targets": [pattern], "weights": weights}}
    if modifier == "GPTQModifier":
        recipe: Any = GPTQModifier(
            config_groups=scheme,
            ignore=["lm_head"],
            dampening_frac=0.01,
            block_size=128,
            actorder="static",
        )
    else:
        recipe = QuantizationModifier(config_groups=scheme, ignore=["lm_head"])
    config = CalibrationConfig()
    windows = calibration_windows(loaded.tokenizer, config)
    data = datasets.Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    oneshot(
        model=loaded.model,
        processor=loaded.tokenizer,  # the model came from a .gguf file, not a folder
        dataset=data,
        recipe=recipe,
        num_calibration_samples=config.samples,
        max_seq_length=config.seq_len,
        shuffle_calibration_samples=False,
    )
    quantized = [n for n, m in loaded.model.named_modules() if hasattr(m, "quantization_scheme")]
    if sorted(quantized) != sorted(paths):
        raise SystemExit(f"llm-compressor quantized {len(quantized)} modules, not the targets")
    return paths


def stored_ratio(model: Any, paths: list[str], bits: int, group: int) -> dict[str, Any]:
    """Dense bf16 bits of the targets over their bits in the pack-quantized form (bf16
    scales), counted as aecompress counts its own gptq / rtn."""
    from aecompress.methods.quantize import QuantScheme, stored_bits

    scheme = QuantScheme(bits, group, True)
    shapes = [tuple(model.get_submodule(p).weight.shape) for p in paths]
    stored = sum(stored_bits(scheme, rows, cols, 16) for rows, cols in shapes)
    dense = sum(16 * rows * cols for rows, cols in shapes)
    weights = sum(rows * cols for rows, cols in shapes)
    return {"ratio": dense / stored, "stored_bits": stored, "target_bits": dense} | {
        "target_params": weights
    }


def run_one(name: str, targets: str, recipe_path: Path, results: Path) -> None:
    """In a fresh process: quantize, evaluate the sweep's tasks, append the records."""
    import torch
    from speed import copy_model  # benchmarks/speed.py, beside this file

    from aecompress.evaluation.tasks import run_task
    from aecompress.models import load_model
    from aecompress.sweep import SweepRecipe

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sweep = SweepRecipe.from_yaml(recipe_path)
    modifier, bits, group, _ = CONFIGS[name]
    # oneshot reads the model's config from its folder: a plain fp32 copy, not the GGUF file
    copy = Path(tempfile.gettempdir()) / "aecompress-smollm2-fp32"
    loaded = load_model(copy_model({"folder": str(copy)})["folder"])
    start = time.perf_counter()
    paths = quantize(loaded, targets, modifier, bits, group)
    extra = {"compress_seconds": time.perf_counter() - start}
    print(f"{name}: oneshot {extra['compress_seconds']:.0f} s", flush=True)
    extra |= stored_ratio(loaded.model, paths, bits, group)
    cell = cell_of(name, sweep.models[0], targets)
    for spec in tasks_of(sweep, cell):  # each recorded when done: time and peak RSS so far
        result = run_task(spec.task, loaded.model, loaded.tokenizer, progress=False, **spec.options)
        measured = {
            "wall_seconds": time.perf_counter() - STARTED,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "torch_threads": torch.get_num_threads(),
        }
        append(results, {"cell": cell, "status": "ok", **asdict(result), **extra, **measured})


def append(path: Path, record: dict[str, Any]) -> None:
    """One line in one write (the sweep's shards may be appending to the same file)."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(handle, data)
    finally:
        os.close(handle)


def tasks_of(sweep: Any, cell: dict[str, Any]) -> list[Any]:
    """The sweep's tasks of a configuration's cell (its ratio, label and targets)."""
    return [spec for spec in sweep.tasks if spec.runs_on(cell)]


def recorded(results: Path, cell: dict[str, Any], sweep: Any) -> bool:
    """Whether every task of the configuration's cell is recorded ok, with its settings."""
    from aecompress.sweep import ResultsLog

    return not ResultsLog.read(results).pending(cell, tasks_of(sweep, cell))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path, help="the quantization sweep recipe (its tasks)")
    parser.add_argument("--results", type=Path, required=True, help="the sweep's results JSONL")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        help="default: those whose ratio column is among the recipe's ratios",
    )
    parser.add_argument("--targets", default=MLPS, help="layers quantized (default: %(default)s)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.targets, args.recipe, args.results)
        return
    from aecompress.sweep import SweepRecipe

    sweep = SweepRecipe.from_yaml(args.recipe)
    for name in args.configs or [n for n in CONFIGS if CONFIGS[n][3] in sweep.ratios]:
        if recorded(args.results, cell_of(name, sweep.models[0], args.targets), sweep):
            print(f"{name}: recorded", flush=True)
            continue
        command = [sys.executable, __file__, str(args.recipe), "--results", str(args.results)]
        command += ["--targets", args.targets]
        finished = subprocess.run([*command, "--one", name])
        print(f"{name}: exit status {finished.returncode}", flush=True)


if __name__ == "__main__":
    main()
