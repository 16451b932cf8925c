"""Sweep reports: Markdown and CSV tables and PNG plots of a results file."""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

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
    "settings",
    "metric",
    "value",
    "compress_seconds",
    "achieved_ratio",
)
# settings that do not tell measurements apart in a table: the split has its own column,
# the batch size does not change a metric, and values are averaged over seeds
_SAME_MEASUREMENT = ("split", "batch_size", "seed")


class TableKey(NamedTuple):
    """One table of a report: a model's targets, a task's metric on a split, its settings."""

    model: str
    targets: str
    task: str
    split: str
    settings: str
    metric: str


def measurement_settings(record: dict[str, Any]) -> str:
    """The record's task settings that make it another measurement, as JSON."""
    settings = record.get("settings") or {}
    return json.dumps({k: v for k, v in sorted(settings.items()) if k not in _SAME_MEASUREMENT})


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
                    "settings": measurement_settings(record),
                    "metric": metric,
                    "value": value,
                    "compress_seconds": record.get("compress_seconds", 0.0),
                    "achieved_ratio": record.get("ratio", 1.0),
                }
            )
    return rows


def _method_name(row: dict[str, Any]) -> str:
    return row["label"] if row["group"] in ("", "none") else f"{row['label']} ({row['group']})"


Table = tuple[TableKey, str, list[dict[str, Any]], list[float]]


def _tables(rows: list[dict[str, Any]]) -> Iterator[Table]:
    """Each table's key, the settings that set it apart from the same task's other tables
    ("" if none), its compressed rows, and the dense values (one per seed)."""
    names = _distinct_settings(rows)
    dense: dict[tuple[str, ...], list[float]] = {}
    for r in rows:
        if r["label"] == "dense":
            measured = (r["model"], r["task"], r["split"], r["metric"], r["settings"])
            dense.setdefault(measured, []).append(r["value"])
    compressed = [r for r in rows if r["label"] != "dense"]
    for key in sorted({_table_key(r) for r in compressed}):
        subset = [r for r in compressed if _table_key(r) == key]
        measured = (key.model, key.task, key.split, key.metric, key.settings)
        yield key, names[measured], subset, dense.get(measured, [])


def _table_key(row: dict[str, Any]) -> TableKey:
    return TableKey(*(row[f] for f in TableKey._fields))


def _distinct_settings(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], str]:
    """For each (model, task, split, metric, settings) of the rows, the settings that differ
    from the same task's other settings ("seq_len 2048, full true"); "" when it has one."""
    groups: dict[tuple[str, ...], set[str]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"], r["split"], r["metric"]), set()).add(
            r["settings"]
        )
    names = {}
    for group, variants in groups.items():
        parsed = {v: json.loads(v) for v in variants}
        keys = sorted({k for p in parsed.values() for k in p})
        differing = [k for k in keys if len({json.dumps(p.get(k)) for p in parsed.values()}) > 1]
        for variant, settings in parsed.items():
            shown = ", ".join(f"{k} {json.dumps(settings.get(k))}" for k in differing)
            names[(*group, variant)] = shown
    return names


def _in_order(names: Iterable[str]) -> list[str]:
    """Distinct names in the order they first appear (a sweep's: the recipe's order)."""
    return list(dict.fromkeys(names))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _spread(values: list[float]) -> str:
    """' ± s (n seeds)', the sample standard deviation of values from several seeds, else ''
    (a value beside another with more seeds is from one)."""
    return f" ± {statistics.stdev(values):.2g} ({len(values)} seeds)" if len(values) > 1 else ""


def results_tables(tables: list[Table]) -> str:
    """Markdown: per model, target and task metric, methods x ratios (delta to dense)."""
    sections = []
    for key, shown, subset, reference in tables:
        ratios = sorted({r["ratio"] for r in subset})
        lines = [
            f"### {key.model}: {key.targets}, {key.task} {key.metric} ({key.split}"
            + (f"; {shown})" if shown else ")"),
            "",
            f"dense: {_mean(reference):.4g}{_spread(reference)}"
            if reference
            else "dense: not measured",
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
                if not values:
                    cells.append("")
                    continue
                delta = f" ({_mean(values) - _mean(reference):+.3g})" if reference else ""
                cells.append(f"{_mean(values):.4g}{_spread(values)}{delta}")
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
    # an earlier version's table had no settings column; "model": a table without rows
    return header in (",".join(COLUMNS), ",".join(c for c in COLUMNS if c != "settings"), "model")


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


def _plot_path(folder: Path, key: TableKey, splits: set[str], shown: str) -> Path:
    """The PNG of a table in `folder`; its name has the split when the table's task is
    reported on several `splits` (validation, test), and the `shown` settings if any."""
    split = [key.split] if len(splits) > 1 else []
    settings = [re.sub(r"[^\w.]+", "-", shown)] if shown else []
    parts = (key.model, key.targets, key.task, *split, *settings, key.metric)
    return folder / ("_".join(p.replace(",", "+").replace("/", "-") for p in parts) + ".png")


def _splits(keys: list[TableKey]) -> dict[tuple[str, ...], set[str]]:
    """The splits of each (model, targets, task, metric) among the tables' keys."""
    splits: dict[tuple[str, ...], set[str]] = {}
    for key in keys:
        splits.setdefault((key.model, key.targets, key.task, key.metric), set()).add(key.split)
    return splits


NOTES_MARKER = "<!-- notes: kept when the report is re-rendered -->"


def _kept_notes(report: Path) -> str:
    """An earlier report's hand-written part: its text from NOTES_MARKER on, if any."""
    if not report.is_file():
        return ""
    earlier = report.read_text()
    start = earlier.find(NOTES_MARKER)
    return "" if start < 0 else "\n" + earlier[start:]


def write_report(results: list[Path], records: list[dict[str, Any]]) -> list[Path]:
    """Write report.md, results.csv and one PNG per table next to the first results file,
    from the latest record of each cell and task (a failure re-run successfully is gone);
    each replaces only an earlier file of a report, and report.md keeps the earlier one's
    notes (its text from a NOTES_MARKER line on)."""
    records = current(records)
    rows = flatten_results(records)
    folder = results[0].parent
    tables = list(_tables(rows))
    splits = _splits([key for key, *_ in tables])
    paths = [
        _plot_path(folder, key, splits[(*key[:3], key.metric)], shown) for key, shown, *_ in tables
    ]
    check_report_files(folder, paths)
    # every task record of a cell repeats the cell's compression time: count it once
    compress = {cell_id(r["cell"]): r.get("compress_seconds", 0.0) for r in records}
    seconds = sum(compress.values()) + sum(r.get("seconds", 0.0) for r in records)
    sources = ", ".join(p.name for p in results)
    text = (
        f"# {folder.name}\n\n"
        f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{os.cpu_count()} CPUs ({platform.platform()}), from {sources}; "
        f"compression + evaluation time of the cells: {seconds / 60:.1f} min. "
        "Values: mean over seeds (± their standard deviation when several); "
        "(difference to dense).\n\n"
    ) + results_tables(tables)
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
    written[0].write_text(text + _kept_notes(written[0]))
    with written[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for path, (key, _shown, subset, reference) in zip(paths, tables, strict=True):
        dense = _mean(reference) if reference else None
        _plot(path, f"{key.model}: {key.targets}", f"{key.task} {key.metric}", subset, dense)
        written.append(path)
    return written
