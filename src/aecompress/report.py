"""Sweep reports: Markdown and CSV tables and PNG plots of a results file."""

from __future__ import annotations

import csv
import os
import platform
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aecompress.outputs import check_file, head
from aecompress.sweep import cell_id, current

COLUMNS = (
    "model",
    "label",
    "targets",
    "group",
    "ratio",
    "seed",
    "task",
    "split",
    "metric",
    "value",
    "compress_seconds",
    "achieved_ratio",
)


def flatten_results(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per successful record and metric, with the cell's fields."""
    rows = []
    for record in records:
        if record.get("status") != "ok":
            continue
        cell = record["cell"]
        for metric, value in record["metrics"].items():
            rows.append(
                {
                    "model": cell["model"],
                    "label": cell["label"],
                    "targets": cell.get("targets", ""),
                    "group": cell.get("group", ""),
                    "ratio": cell["ratio"],
                    "seed": cell.get("seed", 0),
                    "task": record["task"],
                    "split": record.get("split", ""),
                    "metric": metric,
                    "value": value,
                    "compress_seconds": record.get("compress_seconds", 0.0),
                    "achieved_ratio": record.get("ratio", 1.0),
                }
            )
    return rows


def _method_name(row: dict[str, Any]) -> str:
    return row["label"] if row["group"] in ("", "none") else f"{row['label']} ({row['group']})"


def _tables(
    rows: list[dict[str, Any]],
) -> Iterator[tuple[tuple[str, str, str, str, str], list[dict[str, Any]], float | None]]:
    """(model, targets, task, split, metric), its compressed rows, and the dense value."""
    dense = {
        (r["model"], r["task"], r["split"], r["metric"]): r["value"]
        for r in rows
        if r["label"] == "dense"
    }
    compressed = [r for r in rows if r["label"] != "dense"]
    keys = sorted(
        {(r["model"], r["targets"], r["task"], r["split"], r["metric"]) for r in compressed}
    )
    for key in keys:
        model, _targets, task, split, metric = key
        subset = [
            r
            for r in compressed
            if (r["model"], r["targets"], r["task"], r["split"], r["metric"]) == key
        ]
        yield key, subset, dense.get((model, task, split, metric))


def _in_order(names: Iterable[str]) -> list[str]:
    """Distinct names in the order they first appear (a sweep's: the recipe's order)."""
    return list(dict.fromkeys(names))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def results_tables(rows: list[dict[str, Any]]) -> str:
    """Markdown: per model, target and task metric, methods x ratios (delta to dense)."""
    sections = []
    for (model, targets, task, split, metric), subset, reference in _tables(rows):
        ratios = sorted({r["ratio"] for r in subset})
        lines = [
            f"### {model}: {targets}, {task} {metric} ({split})",
            "",
            f"dense: {reference:.4g}" if reference is not None else "dense: not measured",
            "",
            "| method | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
            "|---" * (len(ratios) + 1) + "|",
        ]
        for name in _in_order(_method_name(r) for r in subset):
            cells = []
            for ratio in ratios:
                values = [
                    r["value"] for r in subset if _method_name(r) == name and r["ratio"] == ratio
                ]
                delta = (
                    ""
                    if reference is None or not values
                    else f" ({_mean(values) - reference:+.3g})"
                )
                cells.append(f"{_mean(values):.4g}{delta}" if values else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def process_costs(records: list[dict[str, Any]]) -> str:
    """Markdown: wall time and peak resident memory of each cell's process (records of
    `--executor process`; a cell run in several processes shows its latest)."""
    latest = {cell_id(r["cell"]): r for r in records if "peak_rss_bytes" in r}
    if not latest:
        return ""
    lines = [
        "### Time and peak memory of each cell's process",
        "",
        "Wall time of the cell's own process (loading the model, compressing, every task), "
        "and its peak resident memory.",
        "",
        "| model | targets | method | ratio | compress s | wall s | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in latest.values():
        cell = record["cell"]
        row = {"label": cell["label"], "group": cell.get("group", "")}
        lines.append(
            f"| {cell['model']} | {cell.get('targets', '')} | {_method_name(row)} | "
            f"{cell['ratio']:g} | {record.get('compress_seconds', 0.0):.0f} | "
            f"{record['wall_seconds']:.0f} | {record['peak_rss_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines) + "\n"


def ratio_axis(axes: Any, ratios: list[float]) -> None:
    """A log ratio axis whose only ticks are the grid's ratios, labelled plainly (3, 10, 25)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    axes.set_xscale("log")
    axes.xaxis.set_major_locator(FixedLocator(ratios))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([f"{r:g}" for r in ratios])
    axes.set_xlabel("compression ratio")


def _plot(
    path: Path, title: str, ylabel: str, subset: list[dict[str, Any]], reference: float | None
) -> None:
    """Metric versus ratio per method (log ratio axis); bars when there is one ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _in_order(_method_name(r) for r in subset)
    if len({r["ratio"] for r in subset}) == 1:
        figure, axes = plt.subplots(figsize=(6, 1.5 + 0.3 * len(names)))
        values = [_mean([r["value"] for r in subset if _method_name(r) == n]) for n in names]
        axes.barh(names, values, color="tab:blue")
        axes.invert_yaxis()
        if reference is not None:
            axes.axvline(reference, color="black", linestyle="--", label="dense")
            axes.legend(fontsize=7)
        axes.set_xlabel(f"{ylabel} (ratio {subset[0]['ratio']:g})")
        axes.tick_params(axis="y", labelsize=7)
    else:
        figure, axes = plt.subplots(figsize=(5, 3.5))
        markers = "osD^vP*X"
        for number, name in enumerate(names):
            points = sorted((r["ratio"], r["value"]) for r in subset if _method_name(r) == name)
            axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker=markers[number % len(markers)],
                label=name,
            )
        if reference is not None:
            axes.axhline(reference, color="black", linestyle="--", label="dense")
        ratio_axis(axes, sorted({r["ratio"] for r in subset}))
        axes.set_ylabel(ylabel)
        axes.legend(fontsize=7)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _is_report(path: Path) -> bool:
    text = head(path, 4096).decode(errors="replace")
    return re.match(r"# .*\n\nWritten \d{4}-\d\d-\d\d \d\d:\d\d UTC ", text) is not None


def _is_table(path: Path) -> bool:
    header = head(path, 4096).decode(errors="replace").partition("\n")[0].rstrip("\r")
    return header in (",".join(COLUMNS), "model")  # "model": of a table without rows


def _is_plot(path: Path) -> bool:
    data = head(path, 256)
    return data.startswith(b"\x89PNG") and b"Matplotlib" in data


def check_report_files(folder: Path, plots: Sequence[Path] = ()) -> None:
    """Refuse, before any is written, report files that would replace a file that is not
    an earlier one of a report (or lie in a model folder, or cannot be written)."""
    files = [(folder / "report.md", "a sweep report", _is_report)]
    files += [(folder / "results.csv", "a sweep report's table", _is_table)]
    files += [(path, "a sweep report's plot", _is_plot) for path in plots]
    for path, kind, ours in files:
        check_file(path, f"report file {path}", kind, ours)


def _plot_path(folder: Path, key: tuple[str, str, str, str, str], splits: set[str]) -> Path:
    """The PNG of a table (model, targets, task, split, metric) in `folder`; its name has
    the split when the table's task is reported on several `splits` (validation, test)."""
    model, targets, task, split, metric = key
    parts = (model, targets, task, *([split] if len(splits) > 1 else []), metric)
    return folder / ("_".join(p.replace(",", "+").replace("/", "-") for p in parts) + ".png")


def _splits(keys: list[tuple[str, str, str, str, str]]) -> dict[tuple[str, ...], set[str]]:
    """The splits of each (model, targets, task, metric) among the tables' keys."""
    splits: dict[tuple[str, ...], set[str]] = {}
    for model, targets, task, split, metric in keys:
        splits.setdefault((model, targets, task, metric), set()).add(split)
    return splits


def write_report(results: list[Path], records: list[dict[str, Any]]) -> list[Path]:
    """Write report.md, results.csv and one PNG per table next to the first results file,
    from the latest record of each cell and task (a failure re-run successfully is gone);
    each replaces only an earlier file of a report."""
    records = current(records)
    rows = flatten_results(records)
    folder = results[0].parent
    tables = list(_tables(rows))
    splits = _splits([key for key, *_ in tables])
    plots = [
        (_plot_path(folder, key, splits[(*key[:3], key[4])]), key, subset, ref)
        for key, subset, ref in tables
    ]
    check_report_files(folder, [path for path, *_ in plots])
    # every task record of a cell repeats the cell's compression time: count it once
    compress = {cell_id(r["cell"]): r.get("compress_seconds", 0.0) for r in records}
    seconds = sum(compress.values()) + sum(r.get("seconds", 0.0) for r in records)
    sources = ", ".join(p.name for p in results)
    text = (
        f"# {folder.name}\n\n"
        f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{os.cpu_count()} CPUs ({platform.platform()}), from {sources}; "
        f"compression + evaluation time of the cells: {seconds / 60:.1f} min. "
        "Values: mean over seeds; (difference to dense).\n\n"
    ) + results_tables(rows)
    costs = process_costs(records)
    text += f"\n{costs}" if costs else ""
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        text += "\n### Failed cells\n\n" + "".join(
            f"- {r['cell']['label']} {r['cell'].get('targets', '')} ratio {r['cell']['ratio']} "
            f"{r['task']}: {r['error']}\n"
            for r in failed
        )
    written = [folder / "report.md", folder / "results.csv"]
    written[0].write_text(text)
    with written[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for path, (model, targets, task, _split, metric), subset, reference in plots:
        _plot(path, f"{model}: {targets}", f"{task} {metric}", subset, reference)
        written.append(path)
    return written
