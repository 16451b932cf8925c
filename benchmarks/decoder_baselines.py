"""Decoder baselines at equal stored size: WikiText-2 perplexity of SmolLM2-135M with its MLP
matrices compressed by each method, the dense model measured in the same run.

    PYTHONPATH=src python benchmarks/decoder_baselines.py            # issue 4's comparison
    PYTHONPATH=src python benchmarks/decoder_baselines.py --quick    # 4 windows, 1 ratio
    PYTHONPATH=src python benchmarks/decoder_baselines.py --rows svdllm --split validation

A row is a registered method name with its options and grouping (ROWS; the default
rows are issue 4's comparison). Every row compresses a fresh copy of the dense model.
Calibration statistics go to a fresh cache folder and are collected up front, once
per distinct set of statistics (timed and reported apart); the rows then read them from
the cache, so a row's compression time is the fit alone.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import aecompress
from aecompress.calibration import cached_statistics
from aecompress.evaluation.perplexity import perplexity
from aecompress.methods import make_method
from aecompress.models import LoadedModel, load_model, weights_sha256
from aecompress.recipe import Recipe
from aecompress.targets import resolve_targets


@dataclass(frozen=True)
class Row:
    """One compressed model of the table: a registered method, its options, its grouping."""

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    group: str = "none"
    default: bool = True  # in the run without --rows (issue 4's comparison)


ROWS = [
    Row("svd", "svd"),
    Row("fwsvd", "fwsvd"),
    Row("asvd", "asvd"),
    Row("svdllm", "svdllm"),
    Row("shared-basis:2", "shared-basis", group="layers:2"),
    Row("prune", "prune"),
    Row("ae", "ae"),
    Row("ae-data", "ae-data"),
    # ae-data across pairs of layers with a decoder of 16 hidden units: chosen on WikiText-2
    # validation (16 x 512) at ratio 1.25 against decoder [0.25] and grouping layers / none.
    Row("ae-data:layers2", "ae-data", {"decoder": [16], "sizes": "absolute"}, "layers:2"),
    # Further rows, run with --rows NAME.
    Row("ae-data:small", "ae-data", {"decoder": [0.25]}, default=False),  # cheaper decoder
    Row("ae-data:small-b256", "ae-data", {"decoder": [0.25], "batch_size": 256}, default=False),
]
DEFAULT_ROWS = [r.name for r in ROWS if r.default]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="up,gate,down")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.25, 1.67])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="names from ROWS")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 windows, first ratio only")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.ratios = 4, args.ratios[:1]
    unknown = set(args.rows) - {r.name for r in ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}: use {[r.name for r in ROWS]}")
    return args


def measure(model: torch.nn.Module, loaded: LoadedModel, args: argparse.Namespace) -> float:
    assert loaded.tokenizer is not None
    result = perplexity(
        model,
        loaded.tokenizer,
        split=args.split,
        windows=args.windows,
        seq_len=args.seq_len,
        progress=False,
    )
    return result.perplexity


def recipe_for(row: Row, ratio: float, args: argparse.Namespace) -> Recipe:
    return Recipe.parse(
        {
            "method": row.method,
            "options": row.options,
            "ratio": ratio,
            "targets": args.targets,
            "group": row.group,
            "seed": args.seed,
        }
    )


def calibrate(dense: LoadedModel, rows: list[Row], args: argparse.Namespace) -> dict[str, float]:
    """Collect each distinct set of statistics the rows need into the cache, timed."""
    seconds: dict[str, float] = {}
    for row in rows:
        needed = make_method(row.method, row.options).statistics_needed()
        key = ",".join(sorted(needed))
        if not needed or key in seconds:
            continue
        recipe = recipe_for(row, args.ratios[0], args)
        targets = resolve_targets(dense.model, recipe.targets)
        start = time.perf_counter()
        sha = weights_sha256(dense.model)  # as the engine keys its cache
        cached_statistics(
            dense.model, dense.tokenizer, targets, needed, recipe.calibration, sha, progress=False
        )
        seconds[key] = time.perf_counter() - start
        print(f"calibration {key}: {seconds[key]:.0f} s", flush=True)
    return seconds


def run_row(row: Row, ratio: float, dense: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    fresh = LoadedModel(copy.deepcopy(dense.model), dense.tokenizer, dense.source, dense.auto_class)
    start = time.perf_counter()
    cm = aecompress.compress(fresh, recipe_for(row, ratio, args), progress=False)
    compress_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ppl = measure(cm.model, dense, args)
    widths = sorted({str(g.stored.width) for g in cm.groups})
    result = {
        "row": row.name,
        "method": row.method,
        "options": row.options,
        "group": row.group,
        "ratio": ratio,
        "stored_ratio": cm.totals()["ratio"],
        "width": "/".join(str(w) for w in widths),
        "ppl": ppl,
        "compress_s": compress_seconds,
        "eval_s": time.perf_counter() - start,
    }
    del cm, fresh
    gc.collect()
    return result


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def table(results: list[dict[str, Any]], args: argparse.Namespace, header: list[str]) -> str:
    lines = [*header, ""]
    lines += [
        "| method | options | grouping | ratio | stored ratio | rank / kept / x | "
        f"ppl ({args.split}) | compress s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
        stored = "-" if r["stored_ratio"] is None else f"{r['stored_ratio']:.4f}"
        lines.append(
            f"| {r['row']} | {options} | {r['group']} | {ratio} | {stored} | {r['width']} | "
            f"{r['ppl']:.2f} | {r['compress_s']:.1f} | {r['eval_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["AECOMPRESS_CACHE"] = tempfile.mkdtemp(prefix="aecompress-bench-")
    began, load_before = time.perf_counter(), load_average()
    start = time.perf_counter()
    dense = load_model(args.model)
    load_seconds = time.perf_counter() - start
    results = []
    if not args.no_dense:
        start = time.perf_counter()
        ppl = measure(dense.model, dense, args)
        results.append(
            {
                "row": "dense",
                "method": "-",
                "options": {},
                "group": "-",
                "ratio": None,
                "stored_ratio": None,
                "width": "-",
                "ppl": ppl,
                "compress_s": 0.0,
                "eval_s": time.perf_counter() - start,
            }
        )
        print(f"dense: ppl {ppl:.2f}", flush=True)
    rows = [r for r in ROWS if r.name in args.rows]
    calibration = calibrate(dense, rows, args)
    for ratio in args.ratios:
        for row in rows:
            result = run_row(row, ratio, dense, args)
            results.append(result)
            print(
                f"{row.name} ratio {ratio}: ppl {result['ppl']:.2f} "
                f"(compress {result['compress_s']:.0f} s, eval {result['eval_s']:.0f} s)",
                flush=True,
            )
    total = time.perf_counter() - began
    header = [
        f"# Decoder baselines: {args.model}, targets {args.targets}",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"- command: `PYTHONPATH=src python benchmarks/{Path(__file__).name} "
        f"{' '.join(sys.argv[1:])}`",
        f"- total wall time: {total / 60:.1f} min (model load {load_seconds:.0f} s); "
        f"load average before / after: {load_before} / {load_average()} "
        "(other agents' processes shared the CPUs)",
        f"- WikiText-2 raw {args.split}, first {args.windows} non-overlapping windows of "
        f"{args.seq_len} tokens; calibration: the recipe default (64 x 256 WikiText-2 train "
        f"tokens, seed {args.seed}); seed {args.seed}",
        "- calibration passes (once per set of statistics, shared by the rows needing it): "
        + ("; ".join(f"{k} {v:.0f} s" for k, v in calibration.items()) or "none"),
        "- stored ratio counts every stored number of the compressed groups; compress s is "
        "the fit alone (statistics read from the cache)",
    ]
    text = table(results, args, header)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
