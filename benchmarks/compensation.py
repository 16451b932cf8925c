"""Issue 10's benchmark: methods that compensate their own error, at equal stored size.

SmolLM2-135M with its MLP matrices (or all linear layers) compressed by each row's recipe:
WikiText-2 validation and test perplexity (16 x 512) for every cell (settings are chosen
on validation, test is what is reported), ARC-Easy and PIQA (first 200) for the
rows marked `zero_shot`, wall time and peak resident memory of each cell, the dense model
measured in the same run. Each cell runs in its own process (peak RSS is the cell's own)
on a fp32 copy of the model written once; results are appended to a JSONL file as they
finish, so an interrupted run resumes where it stopped.

    PYTHONPATH=src python benchmarks/compensation.py --out benchmarks/results/compensation
    PYTHONPATH=src python benchmarks/compensation.py --rows sparsegpt:seq --ratios 1.25 --quick
    PYTHONPATH=src python benchmarks/compensation.py --list   # the rows

The external reference, llm-compressor's one-shot SparseGPT and Wanda on the same model,
calibration windows, targets and evaluation (sparsity 1 - 1/R + 1/32: the kept values plus
a one-bit-per-weight mask at ratio R), runs under a Python that has llmcompressor installed
beside aecompress (an optional extra, never a dependency: it pins its own transformers):

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 && \
        /tmp/llmc/bin/pip install llmcompressor -e '.[models]'
    PYTHONPATH=src python benchmarks/compensation.py --rows llmcompressor:sparsegpt \
        --llmcompressor-python /tmp/llmc/bin/python --ratios 1.25
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MLP = "up,gate,down"
LINEAR = "q,k,v,o,up,gate,down"
ZERO_SHOT = ("arc-easy", "piqa")
SPLITS = ("validation", "test")


@dataclass(frozen=True)
class Row:
    """One recipe of the table (fields of aecompress.Recipe besides ratio and targets)."""

    name: str
    recipe: dict[str, Any]
    zero_shot: bool = False  # also ARC-Easy and PIQA (first 200)
    ratios: tuple[float, ...] | None = None  # None: every ratio of the run


def row(name: str, method: str, zero_shot: bool = False, **fields: Any) -> Row:
    """A row; `method` "llmcompressor:MODIFIER" is the external reference (no recipe)."""
    ratios = fields.pop("ratios", None)
    return Row(name, {"method": method, **fields}, zero_shot, ratios)


# the sequential pipeline with each target spelled out (the default is `local`); the SEQ
# rows in results/ ran with granularity `layer`, the default until 2026-11-29 (now `block`)
SEQ = {"pipeline": "sequential", "sequential": {"target": "local"}}
SEQ_DENSE = {"pipeline": "sequential", "sequential": {"target": "dense"}}
# every layer of a block calibrated on the block as it was (llm-compressor's order)
SEQ_BLOCK = {"pipeline": "sequential", "sequential": {"target": "local", "granularity": "block"}}
IND = {"pipeline": "independent"}
REFINE = {"refine": {"steps": 40}}
H16 = {"decoder": [16], "sizes": "absolute"}
REFINE_FAST = {"refine": {"steps": 40, "lr": 1e-3}}
CAL4 = {"samples": 128, "seq_len": 512}
CAL16 = {"samples": 256, "seq_len": 1024, "batch_size": 4}
ROWS = [
    # factorisations, as before (independent) and compensated (sequential)
    row("svd", "svd", **IND),
    row("fwsvd", "fwsvd", **IND, ratios=(1.25,)),
    row("asvd", "asvd", **IND, ratios=(1.25,)),
    row("svdllm", "svdllm", **IND),
    row("svdllm:seq", "svdllm", **SEQ),
    row("svdllm:seq:dense", "svdllm", **SEQ_DENSE),
    row("svdllm:seq:block", "svdllm", **SEQ_BLOCK),
    row("svdllm:seq+refine", "svdllm", **SEQ, **REFINE),
    row("svdllm:seq:block+refine", "svdllm", zero_shot=True, **SEQ_BLOCK, **REFINE),
    row("svdllm:seq:block+refine:lr1e-3", "svdllm", **SEQ_BLOCK, **REFINE_FAST),
    row("svdllm:seq+alloc", "svdllm", **SEQ, allocate="sensitivity"),
    row("svdllm:seq:block+alloc", "svdllm", **SEQ_BLOCK, allocate="sensitivity"),
    row("shared-basis:2", "shared-basis", group="layers:2", **IND),
    row("shared-basis:2:seq", "shared-basis", group="layers:2", **SEQ),
    row("shared-basis:2:seq+refine", "shared-basis", group="layers:2", **SEQ, **REFINE),
    # the AE
    row("ae", "ae", **IND, ratios=(1.25,)),
    row("ae-data", "ae-data", **IND),
    row("ae-data:seq", "ae-data", **SEQ),
    # a layer's decoder: 16 hidden units (the default until 2026-11-29) or linear (since)
    row("ae-data:seq:block:h16", "ae-data", options=H16, **SEQ_BLOCK),
    row(
        "ae-data:seq:block:linear", "ae-data", zero_shot=True, options={"decoder": []}, **SEQ_BLOCK
    ),
    row("ae-data:seq+refine", "ae-data", **SEQ, **REFINE),
    row("ae-data:2:seq", "ae-data", group="layers:2", **SEQ),
    # sparse
    row("prune", "prune", **IND),
    row("prune:seq+refine", "prune", **SEQ, **REFINE),
    row("wanda:seq:dense", "wanda", **SEQ_DENSE),
    row("sparsegpt", "sparsegpt", **IND),
    row("sparsegpt:seq", "sparsegpt", **SEQ),
    row("sparsegpt:seq:dense", "sparsegpt", zero_shot=True, **SEQ_DENSE),
    row("sparsegpt:seq:block", "sparsegpt", **SEQ_BLOCK),
    row("sparsegpt:seq:block+refine", "sparsegpt", zero_shot=True, **SEQ_BLOCK, **REFINE),
    row("sparsegpt:seq:dense:fp32", "sparsegpt", **SEQ_DENSE, storage_dtype="float32"),
    # the storage dtype spelled out (the default is bfloat16): artifact bytes and perplexity
    row("sparsegpt:seq:bf16", "sparsegpt", **SEQ, storage_dtype="bfloat16", ratios=(1.25,)),
    row("sparsegpt:seq:fp32", "sparsegpt", **SEQ, storage_dtype="float32", ratios=(1.25,)),
    row("svdllm:seq:bf16", "svdllm", **SEQ, storage_dtype="bfloat16", ratios=(1.25,)),
    row("svdllm:seq:fp32", "svdllm", **SEQ, storage_dtype="float32", ratios=(1.25,)),
    row("sparsegpt:seq+refine", "sparsegpt", zero_shot=True, **SEQ, **REFINE),
    row("sparsegpt:seq+alloc", "sparsegpt", **SEQ, allocate="sensitivity"),
    # more calibration text: 4x (128 x 512) and 16x (256 x 1024) the default's tokens
    row("sparsegpt:seq:cal4x", "sparsegpt", **SEQ, calibration=CAL4),
    row("sparsegpt:seq:cal16x", "sparsegpt", **SEQ, calibration=CAL16),
    row("sparsegpt:seq:cal4x+refine", "sparsegpt", **SEQ, **REFINE, calibration=CAL4),
    row("svdllm:seq:cal4x", "svdllm", **SEQ, calibration=CAL4),
    # sparse + low rank
    row("sparse-lowrank:seq:dense", "sparse-lowrank", zero_shot=True, **SEQ_DENSE),
    row("sparse-lowrank(ae):seq", "sparse-lowrank", options={"lowrank": "ae-data"}, **SEQ),
    row("sparse-lowrank:seq+refine", "sparse-lowrank", **SEQ, **REFINE),
    # the external reference: llm-compressor 0.14, its default (sequential) pipeline
    row("llmcompressor:sparsegpt", "llmcompressor:SparseGPTModifier", zero_shot=True),
    row("llmcompressor:wanda", "llmcompressor:WandaPruningModifier"),
]
EXTERNAL = "llmcompressor:"
LINEAR_PATHS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def is_external(cell: dict[str, Any]) -> bool:
    """Whether the cell is an llm-compressor row (run under --llmcompressor-python)."""
    return cell["recipe"] is not None and cell["recipe"]["method"].startswith(EXTERNAL)


ROW_ORDER = {entry.name: index for index, entry in enumerate(ROWS)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=[r.name for r in ROWS])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.25, 1.67, 2.5])
    parser.add_argument("--targets", default=MLP, help=f"{MLP} (MLPs) or {LINEAR} (all linear)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--limit", type=int, default=200, help="zero-shot: first N items")
    parser.add_argument("--quick", action="store_true", help="4 windows, no zero-shot")
    parser.add_argument("--out", type=Path, help="folder for results.jsonl and report.md")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument(
        "--llmcompressor-python",
        default=sys.executable,
        help="the Python that runs the llmcompressor:* rows (one with llmcompressor installed)",
    )
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell
    args = parser.parse_args()
    if args.list:
        for entry in ROWS:
            print(f"{entry.name}: {json.dumps(entry.recipe)}")
        sys.exit(0)
    if args.quick:
        args.windows = 4
    unknown = set(args.rows) - {r.name for r in ROWS} - {"dense"}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}: use {[r.name for r in ROWS]}")
    return args


def fp32_copy(folder: Path) -> Path:
    """SmolLM2-135M de-quantised once into a plain fp32 folder (fast to load per cell)."""
    import transformers

    from aecompress.models import load_model

    if (folder / "config.json").is_file():
        return folder
    loaded = load_model("smollm2-135m")
    config = loaded.model.config.to_dict()
    config.pop("quantization_config", None)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    plain.load_state_dict(loaded.model.state_dict())
    plain.save_pretrained(folder)
    assert loaded.tokenizer is not None
    loaded.tokenizer.save_pretrained(folder)
    return folder


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """In this process: load, compress (unless dense), evaluate; times and peak RSS."""
    import aecompress
    from aecompress.artifact import read_manifest
    from aecompress.evaluation.tasks import run_task
    from aecompress.models import load_model

    loaded = load_model(cell["model"])
    start = time.perf_counter()
    ratio = None
    external = is_external(cell)
    if external:
        modifier = cell["recipe"]["method"].removeprefix(EXTERNAL)
        ratio = llmcompressor_prune(loaded, modifier, cell["ratio"], cell["targets"])
    elif cell["recipe"] is not None:
        recipe = {**cell["recipe"], "ratio": cell["ratio"], "targets": cell["targets"]}
        compressed = aecompress.compress(loaded, progress=False, **recipe)
        ratio = compressed.totals()["ratio"]
    compress_seconds = time.perf_counter() - start
    peak_compress = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    artifact_bytes = None
    if cell["recipe"] is not None and not external:
        with tempfile.TemporaryDirectory() as folder:
            compressed.save_pretrained(Path(folder) / "artifact")
            artifact_bytes = read_manifest(Path(folder) / "artifact")["totals"]["artifact_bytes"]
    metrics: dict[str, Any] = {}
    for split in SPLITS:
        wikitext = {"split": split, "windows": cell["windows"], "seq_len": 512}
        metrics[f"wikitext2:{split}"] = run_task(
            "wikitext2", loaded.model, loaded.tokenizer, progress=False, **wikitext
        ).metrics["perplexity"]
    for task in cell["zero_shot"]:
        result = run_task(task, loaded.model, loaded.tokenizer, progress=False, limit=cell["limit"])
        metrics[task] = result.metrics["acc_norm"]
    return {
        **cell,
        "stored_ratio": ratio,
        "artifact_bytes": artifact_bytes,  # the saved weights file
        "metrics": metrics,
        "compress_seconds": round(compress_seconds, 1),
        "peak_rss_mb_compress": peak_compress,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "seconds": round(time.perf_counter() - start, 1),
    }


def llmcompressor_prune(loaded: Any, modifier: str, ratio: float, targets: str) -> float:
    """Prune the targets in place with llm-compressor's one-shot `modifier` at the sparsity
    that stores 1/ratio of their numbers (kept values + a one-bit mask), calibrated on the
    windows aecompress calibrates on; returns the stored ratio counted from the weights."""
    import math

    import datasets
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning

    from aecompress.calibration import CalibrationConfig, calibration_windows

    config = CalibrationConfig()
    windows = calibration_windows(loaded.tokenizer, config)
    data = datasets.Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    names = "|".join(LINEAR_PATHS.get(t, f"{t}_proj") for t in targets.split(","))
    pattern = f"re:.*\\.({names})$"
    sparsity = 1 - 1 / ratio + 1 / 32
    recipe = getattr(pruning, modifier)(sparsity=sparsity, targets=[pattern], ignore=["lm_head"])
    oneshot(
        model=loaded.model,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=config.samples,
        max_seq_length=config.seq_len,
        shuffle_calibration_samples=False,
    )
    dense = stored = 0
    for name, module in loaded.model.named_modules():
        if re.fullmatch(pattern.removeprefix("re:"), name):
            weight = module.weight
            dense += weight.numel()
            stored += int(weight.count_nonzero()) + math.ceil(weight.numel() / 32)
    return dense / stored


def cells(args: argparse.Namespace, model: str) -> list[dict[str, Any]]:
    zero_shot = [] if args.quick else list(ZERO_SHOT)
    base = {"model": model, "windows": args.windows, "limit": args.limit}
    dense = {"row": "dense", "recipe": None, "ratio": None, "targets": None}
    found = [{**base, **dense, "zero_shot": zero_shot}]
    for ratio in args.ratios:
        for entry in ROWS:
            if entry.name not in args.rows or (entry.ratios and ratio not in entry.ratios):
                continue
            found.append(
                {
                    **base,
                    "row": entry.name,
                    "recipe": entry.recipe,
                    "ratio": ratio,
                    "targets": args.targets,
                    "zero_shot": zero_shot if entry.zero_shot else [],
                }
            )
    return found


IDENTITY = ("row", "recipe", "ratio", "targets", "windows", "limit", "zero_shot")
# set on records whose zero-shot accuracies came from an older definition (absent: today's)
CONVENTION = "zero_shot_convention"


def key(cell: dict[str, Any], fields: tuple[str, ...] = (*IDENTITY, CONVENTION)) -> str:
    """What makes a cell itself (not where the model was copied to)."""
    return json.dumps({k: cell.get(k) for k in fields}, sort_keys=True)


# a cell's settings apart from what it measures: one report line each
SETTINGS = tuple(k for k in IDENTITY if k != "zero_shot")


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}, Python {platform.python_version()}"
    )


def report(records: list[dict[str, Any]], args: argparse.Namespace, began: str) -> str:
    """The table: one line per cell's settings, its latest record (a cell re-run with
    zero-shot added replaces the earlier one); older zero-shot accuracies marked."""
    older_dense = next((r for r in records if r["row"] == "dense" and CONVENTION in r), None)
    records = list({key(r, SETTINGS): r for r in records}.values())
    dense = next((r for r in records if r["row"] == "dense"), None)
    lines = [
        "# Compensation benchmark: smollm2-135m (targets: MLP = up,gate,down; linear = all)",
        "",
        f"- started: {began}; machine: {machine()}; load average now "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes may share the CPUs)",
        f"- command: `PYTHONPATH=src python benchmarks/compensation.py {' '.join(sys.argv[1:])}`",
        f"- WikiText-2 raw validation / test, first {args.windows} windows of 512 tokens each "
        "(settings and defaults chosen on validation; test reported); zero-shot "
        f"acc_norm on the first {args.limit} items (ARC-Easy test, PIQA validation); calibration "
        "64 x 256 WikiText-2 train tokens (rows named cal4x: 128 x 512, cal16x: 256 x 1024), "
        "seed 0; every choice of setting made on validation",
        "- stored ratio counts every stored number of the compressed groups, positions included;"
        " seconds: compression alone; peak RSS: the cell's own process",
        "",
        "| row | targets | ratio | stored ratio | val ppl | test ppl | arc-easy | piqa "
        "| compress s | peak RSS MB | artifact MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    marked = [r for r in records if CONVENTION in r]
    if dense is not None:
        m = dense["metrics"]
        lines.append(
            f"| dense | - | - | - | {_ppl(m, 'validation')} | {_ppl(m, 'test')} | "
            f"{_acc(dense, 'arc-easy')} | {_acc(dense, 'piqa')} | - | {dense['peak_rss_mb']} | - |"
        )
    compressed = [r for r in records if r["row"] != "dense"]
    for r in sorted(
        compressed, key=lambda r: (r["targets"], r["ratio"], ROW_ORDER.get(r["row"], 0))
    ):
        targets = (
            "MLP" if r["targets"] == MLP else "linear" if r["targets"] == LINEAR else r["targets"]
        )
        if "error" in r:
            lines.append(
                f"| {r['row']} | {targets} | {r['ratio']} | failed: {r['error']} | | | | | | | |"
            )
            continue
        m = r["metrics"]
        lines.append(
            f"| {r['row']} | {targets} | {r['ratio']} | {r['stored_ratio']:.4f} | "
            f"{_ppl(m, 'validation')} | {_ppl(m, 'test')} | "
            f"{_acc(r, 'arc-easy')} | {_acc(r, 'piqa')} | {r['compress_seconds']:.0f} | "
            f"{r['peak_rss_mb_compress']} | {_megabytes(r.get('artifact_bytes'))} |"
        )
    if marked:
        lines += ["", f"\\* zero-shot {marked[0][CONVENTION]}; they compare with each other only"]
        if older_dense is not None:
            lines[-1] += (
                f" and with the dense model's {_acc(older_dense, 'arc-easy')} / "
                f"{_acc(older_dense, 'piqa')} then"
            )
    return "\n".join(lines) + "\n"


def _ppl(metrics: dict[str, Any], split: str) -> str:
    return f"{metrics[f'wikitext2:{split}']:.2f}"


def _megabytes(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f}"


def _acc(record: dict[str, Any], task: str) -> str:
    if task not in record["metrics"]:
        return "-"
    return f"{record['metrics'][task]:.1f}" + ("\\*" if CONVENTION in record else "")


def main() -> None:
    args = parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="compensation-"))
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    began = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    model = str(fp32_copy(Path(tempfile.gettempdir()) / "aecompress-smollm2-fp32"))
    done = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            record = json.loads(line)
            if "error" not in record:
                done[key(record)] = record
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for cell in cells(args, model):
        identity = key(cell)
        if identity in done:
            continue
        python = args.llmcompressor_python if is_external(cell) else sys.executable
        command = [python, __file__, "--cell", json.dumps(cell)]
        finished = subprocess.run(command, capture_output=True, text=True, env=env)
        if finished.returncode == 0:
            record = json.loads(finished.stdout.strip().splitlines()[-1])
        else:
            record = {**cell, "error": finished.stderr.strip().splitlines()[-1][:200]}
        with results.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        done[identity] = record
        shown = ("row", "ratio", "metrics", "compress_seconds", "error")
        print(json.dumps({k: record.get(k) for k in shown}), flush=True)
    (out / "report.md").write_text(report(list(done.values()), args, began))
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
