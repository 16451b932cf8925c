"""Perplexity against stored bits per weight, one curve per method (issue 28's frontier).

Reads a sweep's results file (the latest record of each cell, as the report does) and
draws one PNG per split of a perplexity task beside it: x is the cell's stored bits over
its target weights (`stored_bits / target_params`), y its perplexity on a log axis, the
dense model's as a dashed line. `--targets` keeps the cells of those targets only (a
sweep over several, e.g. the MLPs and every linear layer), named in the file; without it,
the targets of most cells, unnamed.

    PYTHONPATH=src python benchmarks/frontier_plot.py benchmarks/results/frontier/results.jsonl
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def bits_per_weight(record: dict[str, Any]) -> float:
    """Stored bits over the target's weights (llmcompressor_reference.py's records before
    it wrote `target_params` count their targets' bits in bf16: 16 a weight)."""
    weights = record.get("target_params") or record["target_bits"] / 16
    return record["stored_bits"] / weights


def _most_common(values: Iterable[Any]) -> Any:
    """The value found most often (the first of those tied), None if there is none."""
    found = Counter(values).most_common(1)
    return found[0][0] if found else None


def curves(
    records: list[dict[str, Any]], task: str, split: str, targets: str | None = None
) -> tuple[dict[str, list[tuple[float, float]]], float | None]:
    """Each method's (bits per weight, perplexity) points, sorted by bits, and the dense
    perplexity, from the ok records of `task` on `split` of `targets` (default: those of
    most cells) with the grid's settings: those of most records (a few best rows measured
    again on longer windows are not on the curves)."""
    from aecompress.report import measurement_settings

    records = [
        r for r in records if r["status"] == "ok" and r["task"] == task and r.get("split") == split
    ]
    grid = _most_common(measurement_settings(r) for r in records)
    cells = [r["cell"].get("targets") for r in records if r["cell"]["label"] != "dense"]
    targets = targets or _most_common(cells)
    points: dict[str, list[tuple[float, float]]] = {}
    dense = None
    for record in records:
        if measurement_settings(record) != grid:
            continue
        value = record["metrics"]["perplexity"]
        if record["cell"]["label"] == "dense":
            dense = value
        elif record["cell"].get("targets") == targets:
            points.setdefault(record["cell"]["label"], []).append((bits_per_weight(record), value))
    return {label: sorted(values) for label, values in points.items()}, dense


def plot(results: Path, task: str, split: str, targets: str | None = None) -> Path:
    """Write `<task>_<split>_perplexity_vs_bits.png` beside the results file
    (`<task>_<split>_<targets>_...` with targets, `+` between their names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aecompress.sweep import current, read_results

    methods, dense = curves(current(read_results(results)), task, split, targets)
    figure, axes = plt.subplots(figsize=(6, 4))
    for number, (label, points) in enumerate(methods.items()):
        axes.plot(*zip(*points, strict=True), marker="osD^vP*X"[number % 8], label=label)
    if dense is not None:
        axes.axhline(dense, color="black", linestyle="--", label=f"dense ({dense:.2f})")
    axes.set_yscale("log")
    axes.set_xlabel("stored bits per weight")
    axes.set_ylabel(f"{task} perplexity ({split})")
    axes.legend(fontsize=7)
    figure.tight_layout()
    named = f"{task}_{split}" + (f"_{targets.replace(',', '+')}" if targets else "")
    path = results.parent / f"{named}_perplexity_vs_bits.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a sweep's results JSONL")
    parser.add_argument("--task", default="wikitext2")
    parser.add_argument("--splits", nargs="+", default=["test", "validation"])
    parser.add_argument("--targets", help="only the cells of these targets (as the sweep's)")
    args = parser.parse_args()
    for split in args.splits:
        print(plot(args.results, args.task, split, args.targets))


if __name__ == "__main__":
    main()
