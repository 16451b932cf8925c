"""Command line: compress, evaluate, inspect."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer._click.core import ParameterSource  # the click that typer bundles
from typer._click.exceptions import ClickException

from aecompress.errors import AecompressError, first_line
from aecompress.evaluation.tasks import task_table
from aecompress.memory import map_large_allocations
from aecompress.outputs import check_artifact_folder, check_file, check_new_folder
from aecompress.recommended import RECOMMENDED

if TYPE_CHECKING:
    from aecompress.estimate import MemoryEstimate
    from aecompress.recipe import Recipe
    from aecompress.sweep import Executor

INTERRUPTED = 130  # the exit status after Ctrl-C
MAX_ERROR = 1000  # characters of an error line

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: wrapped, never cut with "..."
    help="Compress pretrained transformer language models offline and measure what was lost.",
)


def _starting(what: str) -> None:
    """A first line on stderr, before a command's imports (torch, transformers: seconds)."""
    typer.echo(f"aecompress: {what} (loading torch and transformers)", err=True)


def _parse_options(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """KEY=VALUE pairs (given with `flag`); values are read as YAML (numbers, booleans,
    lists); a dotted key sets a nested field (loss.rmse_weight=1, or sparsegpt.damp=0.1 for
    one of several methods)."""
    from aecompress.recipe import parse_yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AecompressError(f"{flag} takes KEY=VALUE, got '{pair}'")
        parsed = parse_yaml(value, f"{flag} {key.strip()}")  # never quotes the value
        *parents, leaf = key.strip().split(".")
        node = options
        for parent in parents:
            child = node.setdefault(parent, {})
            if not isinstance(child, dict):
                raise AecompressError(f"{flag} {key}: {parent} is already set to a value")
            node = child
        node[leaf] = parsed
    return options


@app.command()
def compress(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Argument(help="minilm-l6, smollm2-135m, a folder, a .gguf file or a hub id")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="artifact folder to write")],
    method: Annotated[
        str | None,
        typer.Option(
            help="method, or FAMILIES=METHOD;FAMILIES=METHOD (default: the recommended one "
            "for the model's kind, see `methods`)"
        ),
    ] = None,
    ratio: Annotated[
        float | None,
        typer.Option(
            help="dense bits / stored bits of each group, > 1 (80% of the size: 1.25); "
            "default: the recommended method's"
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="quantize the stored matrices in the same budget: int4:g64, int3:row, ..."
        ),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="families embed,q,k,v,o,up,gate,down (ffn, attn: a layer's whole MLP or "
            "attention, for ffn-neurons, attn-dims) or re:REGEX (default: the recommended "
            "ones, or a FAMILIES=METHOD rule's)"
        ),
    ] = None,
    group: Annotated[
        str, typer.Option(help="none | layers | layers:K (stack a family across layers)")
    ] = "none",
    option: Annotated[
        list[str] | None, typer.Option(help="method option KEY=VALUE (repeatable)")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="YAML recipe; flags given beside it override it")
    ] = None,
    untie_embeddings: Annotated[bool, typer.Option(help="keep a tied output head dense")] = False,
    pipeline: Annotated[
        str, typer.Option(help="auto | independent | sequential (compensates upstream error)")
    ] = "auto",
    refine: Annotated[
        int | None,
        typer.Option(
            help="Adam steps per block on its output error (sequential; default: the "
            "method's own, 40 for attn-dims, else 0)"
        ),
    ] = None,
    allocate: Annotated[
        str, typer.Option(help="uniform | sensitivity (per-matrix ratios, same total)")
    ] = "uniform",
    storage_dtype: Annotated[
        str, typer.Option(help="auto | float32 | bfloat16 | float16 (stored floats)")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help="read the model from disk a block at a time, writing the artifact as it "
            "goes (default: when loaded whole it would not fit in memory)",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    calibration_samples: Annotated[
        int | None, typer.Option(help="calibration windows (default 64; ffn-neurons 128)")
    ] = None,
    calibration_seq_len: Annotated[
        int | None,
        typer.Option(help="tokens per calibration window (default 256; ffn-neurons 512)"),
    ] = None,
    calibration_data: Annotated[
        str | None,
        typer.Option(
            help="calibration text: a .txt, .jsonl or .parquet file or a saved `datasets` "
            "folder ('text' field; default: WikiText-2 train)"
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an existing artifact at -o")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="print the expected peak memory (in memory, streamed) and stop"
        ),
    ] = False,
    ignore_memory_estimate: Annotated[
        bool,
        typer.Option(
            "--ignore-memory-estimate",
            help="run even when the expected peak memory exceeds the available memory",
        ),
    ] = False,
) -> None:
    """Compress MODEL and write an artifact folder (by default with the setting recommended
    for its kind: `aecompress methods`)."""
    check_artifact_folder(output, f"-o {output}", overwrite)
    _starting(f"compressing {model}")
    import torch

    from aecompress.artifact import read_manifest
    from aecompress.estimate import check_fits
    from aecompress.memory import available_memory
    from aecompress.recipe import Recipe
    from aecompress.streamed import compress_to_folder

    options = _parse_options(option or [])
    calibration = {
        "samples": calibration_samples,
        "seq_len": calibration_seq_len,
        "data": calibration_data,
    }
    fields = {
        "model": model,
        "method": method,
        "options": options,
        "ratio": ratio,
        "quantize": quantize,
        "targets": targets,
        "calibration": {k: v for k, v in calibration.items() if v is not None},
        "group": group,
        "untie_embeddings": untie_embeddings,
        "pipeline": pipeline,
        "refine": refine,
        "allocate": allocate,
        "storage_dtype": storage_dtype,
        "device": device,
        "stream": "auto" if stream is None else stream,
        "seed": seed,
    }
    if refine is None:  # the methods' own (Method.refine_steps)
        del fields["refine"]
    if recipe is None:
        plan = Recipe.parse({**fields, **_method_fields(model, method, ratio, targets, options)})
    else:  # flags given beside the recipe (and MODEL) override it
        given = {k: v for k, v in fields.items() if k == "model" or _given(ctx, k)}
        plan, changes = Recipe.from_yaml(recipe).override(given)
        if changes:
            typer.echo(f"the command line overrides {recipe}: {'; '.join(changes)}")
    if plan.refine.steps and "refine" not in plan.model_fields_set:
        steps = plan.refine.steps
        typer.echo(f"refining each block {steps} steps, {plan.method}'s default (--refine 0: none)")
    if plan.calibration_is_methods_own():
        size = f"{plan.calibration.samples} windows of {plan.calibration.seq_len} tokens"
        typer.echo(
            f"calibrating on {size}, {plan.method}'s default "
            "(--calibration-samples / --calibration-seq-len: others)"
        )
    plan.calibration.check()
    available = available_memory()
    estimate = _memory_estimate(model, plan, available, dry_run)
    if estimate is None:
        return
    if not ignore_memory_estimate:
        check_fits(estimate, available)
    start = time.perf_counter()
    try:
        compress_to_folder(model, output, plan)
    except torch.linalg.LinAlgError as error:
        raise AecompressError(f"{plan.method} failed numerically: {first_line(error)}") from error
    seconds = time.perf_counter() - start
    manifest = read_manifest(output)
    totals = manifest["totals"]
    what = f"{len(manifest['groups'])} groups"
    if sliced := manifest.get("sliced"):
        what = "the blocks' linear layers"
        typer.echo(
            f"residual stream cut from {sliced['hidden_size']} to {sliced['width']} directions "
            f"(the output head untied); whole model {int(totals['model_params_dense']):,} -> "
            f"{int(totals['model_params_artifact']):,} parameters"
        )
    typer.echo(
        f"{what}, {int(totals['target_params']):,} weights: "
        f"{int(totals['target_bits']):,} -> {int(totals['stored_bits']):,} bits (ratio "
        f"{totals['ratio']:.3f}; number ratio "
        f"{totals['number_ratio']:.3f}) in {seconds:.1f} s"
    )
    if manifest["tied_output"]:
        typer.echo(f"tied output head {manifest['tied_output']} shares the embedding's factors")
    typer.echo(f"wrote {output}")


# \b: click keeps the table's lines as they are
@app.command(epilog=f"Tasks (also `aecompress tasks`):\n\n\b\n{task_table()}")
def evaluate(
    model: Annotated[str, typer.Argument(help="an artifact folder or a model (as for compress)")],
    task: Annotated[list[str] | None, typer.Option(help="task to run (repeatable)")] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option(
            "--task-option", "-O", help="KEY=VALUE for the tasks that take KEY (repeatable)"
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help="= --task-option split=S")] = None,
    windows: Annotated[int | None, typer.Option(help="= --task-option windows=N")] = None,
    seq_len: Annotated[int | None, typer.Option(help="= --task-option seq_len=N")] = None,
    limit: Annotated[int | None, typer.Option(help="= --task-option limit=N")] = None,
    batch_size: Annotated[int | None, typer.Option(help="= --task-option batch_size=N")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help="block by block, one block's weights in memory (perplexity and multiple "
            "choice); default: when the model loaded whole would not fit",
            show_default=False,
        ),
    ] = None,
    probe: Annotated[
        bool,
        typer.Option(
            "--probe", help="glue: a frozen-feature probe (glue-*-probe) instead of fine-tuning"
        ),
    ] = False,
    dense: Annotated[bool, typer.Option(help="also report the artifact's base model")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an earlier --json file")
    ] = False,
) -> None:
    """Evaluate a model or an artifact (beside its dense base model, cached)."""
    _starting(f"evaluating {model}")
    from aecompress.evaluation.results import format_table, is_records_file, write_records
    from aecompress.evaluation.runner import evaluate as run_evaluate

    options = _parse_options(task_option or [], "--task-option")
    shorthands = {
        "split": split,
        "windows": windows,
        "seq_len": seq_len,
        "limit": limit,
        "batch_size": batch_size,
    }
    for key, value in shorthands.items():
        if value is not None:
            if key in options:
                raise AecompressError(f"{key} is given twice (--task-option and its own flag)")
            options[key] = value
    if json_out is not None:
        what = f"--json {json_out}"
        check_file(json_out, what, "an evaluate --json file", is_records_file, overwrite)
    tasks = task or ["wikitext2"]
    results, dense_results = run_evaluate(
        model, tasks, options, dense=dense, probe=probe, device=device, stream=stream
    )
    typer.echo(format_table(results, dense_results if dense_results else None))
    if json_out is not None:
        write_records(json_out, model, results, dense_results)
        typer.echo(f"wrote {json_out}")


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="artifact folder")],
    per_matrix: Annotated[
        bool, typer.Option("--per-matrix", help="one row per group of matrices")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="the manifest with verified sizes, as JSON")
    ] = False,
) -> None:
    """Show what an artifact stores: per family (or matrix), stored numbers, bytes, ratios."""
    _starting(f"reading {artifact}")
    from aecompress.summary import artifact_facts, describe_artifact

    if as_json:
        typer.echo(json.dumps(artifact_facts(artifact), indent=2))
    else:
        typer.echo(describe_artifact(artifact, per_matrix=per_matrix))


@app.command()
def tasks() -> None:
    """List the evaluation tasks: the model each needs, its metrics, splits and options."""
    from aecompress.evaluation.tasks import options_table

    typer.echo(task_table())
    typer.echo(f"\nOptions (`evaluate --task-option KEY=VALUE`):\n\n{options_table()}")


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="artifact folder")],
    output: Annotated[Path | None, typer.Argument(help="folder to write (new or empty)")] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="dense (every matrix decoded) | compressed-tensors (gptq / rtn kept packed)",
        ),
    ] = "dense",
    dense: Annotated[
        Path | None, typer.Option("--dense", help="folder to write: --format dense")
    ] = None,
) -> None:
    """Write an artifact's model as a folder that loads in transformers without aecompress:
    every matrix decoded (dense), or gptq / rtn groups in the compressed-tensors format
    (the compressed-tensors package needed to load it; see docs/export.md)."""
    _starting(f"exporting {artifact}")
    from aecompress.artifact import EXPORTS

    if format not in EXPORTS:
        raise AecompressError(f"--format must be {' or '.join(EXPORTS)} (got '{format}')")
    if dense is not None and (output is not None or format != "dense"):
        raise AecompressError("--dense OUT is --format dense OUT: give one output folder")
    where = dense or output
    if where is None:
        raise AecompressError("export needs a folder to write: OUT or --dense OUT")
    check_new_folder(where, f"--dense {where}" if dense else str(where))
    EXPORTS[format](artifact, where)
    typer.echo(f"wrote {where}")


@app.command()
def methods() -> None:
    """List the compression methods: what each stores and minimises, its options, and which
    is recommended (the default of `compress`) for which kind of model."""
    from aecompress.catalog import method_catalog, whole_model_catalog

    typer.echo("| method | what it stores and minimises | options | recommended for |")
    typer.echo("|---|---|---|---|")
    for entry in [*method_catalog().values(), *whole_model_catalog().values()]:
        summary = entry.summary.replace("|", "\\|")
        kinds = [r.label for r in RECOMMENDED.values() if r.method == entry.name]
        typer.echo(
            f"| {entry.name} | {summary} | {', '.join(entry.options) or '-'} | "
            f"{' and '.join(kinds) or '-'} |"
        )
    typer.echo("\nRecommended, and what `compress` does when --method, --ratio or --targets is")
    typer.echo("not given (the reasons: the module aecompress.recommended):")
    for advice in RECOMMENDED.values():
        typer.echo(f"- {advice.label}: {advice.flags()}")


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="sweep recipe (YAML)")],
    results: Annotated[
        Path | None, typer.Option(help="results JSONL (default: beside the recipe)")
    ] = None,
    shard: Annotated[
        str, typer.Option(help="I/N: run every N-th cell from the I-th (N parallel processes)")
    ] = "0/1",
    executor: Annotated[
        str,
        typer.Option(
            help="serial (this process) | process (a child process per cell, timed, peak RSS)"
            " | ray (one Ray task per cell)"
        ),
    ] = "serial",
    address: Annotated[
        str | None, typer.Option(help="ray: the cluster's address (default: local)")
    ] = None,
) -> None:
    """Run a grid of compressions and evaluations; resumable; then write the report."""
    _starting(f"sweep {recipe}")
    from aecompress.report import check_report_files, write_report
    from aecompress.sweep import SweepRecipe, is_results_file, parse_shard, run_sweep

    plan = SweepRecipe.from_yaml(recipe)
    path = results or recipe.parent / "results" / plan.name / "results.jsonl"
    check_file(path, f"--results {path}", "a sweep's results file", is_results_file)
    check_report_files(path.parent)
    start = time.perf_counter()
    records = run_sweep(plan, path, shard=parse_shard(shard), executor=_executor(executor, address))
    typer.echo(f"{len(records)} records in {path} ({time.perf_counter() - start:.0f} s this run)")
    for written in write_report([path], records):
        typer.echo(f"wrote {written}")


def _memory_estimate(
    model: str, plan: Recipe, available: int | None, dry_run: bool
) -> MemoryEstimate | None:
    """The expected peak of the path the run takes (streamed or not, as
    compress_to_folder chooses it), said in one line; with `dry_run` the table of both
    paths instead, and None (nothing more to do)."""
    from aecompress.estimate import describe, estimate_memory
    from aecompress.models import model_skeleton
    from aecompress.pipeline.plan import plan_groups
    from aecompress.streamed import streaming_blockers
    from aecompress.streaming import streamable_folder
    from aecompress.targets import transformer_blocks

    skeleton = model_skeleton(model)
    paths = (False, True) if transformer_blocks(skeleton) is not None else (False,)
    estimates = [estimate_memory(skeleton, plan, streamed=streamed) for streamed in paths]
    if dry_run:
        typer.echo(f"expected peak memory of compressing {model}:")
        typer.echo(describe(estimates))
        return None
    whole = estimates[0]
    fits = available is None or whole.total <= available
    streams = plan.stream is True or (
        plan.stream == "auto"
        and not fits
        and streamable_folder(model) is not None
        and not streaming_blockers(plan, plan_groups(skeleton, plan), whole.pipeline, skeleton)
    )
    chosen = estimates[-1] if streams else whole
    uncounted = "".join(f"; not counted: {note}" for note in chosen.notes)
    typer.echo(f"expected peak memory: {chosen.total / 2**30:.2f} GiB ({chosen.path}){uncounted}")
    return chosen


def _method_fields(
    model: str,
    method: str | None,
    ratio: float | None,
    targets: str | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The recipe's method, options, ratio and targets: those given, the rest from the
    setting recommended for the model's kind (recommended.py), said in one line."""
    from aecompress.catalog import WHOLE_MODEL

    rules = method is not None and "=" in method
    if method in WHOLE_MODEL and targets is None:
        targets = ""  # its own (slicegpt: every linear layer of the blocks)
    if method is not None and ratio is not None and (targets is not None or rules):
        return {"method": method, "options": options, "ratio": ratio, "targets": targets or []}
    from aecompress.models import model_kind

    advice = RECOMMENDED[model_kind(model)]
    if method not in (None, advice.method) and ratio is None:
        raise AecompressError(
            f"--method {method} needs --ratio (the recommended ratio {advice.ratio:g} for "
            f"{advice.label} is {advice.method}'s: {advice.flags()})"
        )
    taken = []
    if method is None:
        method = advice.method
        taken.append(f"--method {method}")
    if ratio is None:  # the method's fixed options go with the recommended ratio only
        ratio = advice.ratio
        options = {**advice.options, **options}
        taken += [f"--option {k}={v}" for k, v in advice.options.items()]
        taken.append(f"--ratio {ratio:g}")
    if targets is None and not rules:
        targets = ",".join(advice.targets)
        taken.append(f"--targets {targets}")
    typer.echo(f"using the recommended {' '.join(taken)} for {advice.label}")
    return {"method": method, "options": options, "ratio": ratio, "targets": targets or []}


# recipe field -> the compress parameters that set it (default: the field's own name)
_FIELD_FLAGS = {
    "options": ("option",),
    "calibration": ("calibration_samples", "calibration_seq_len", "calibration_data"),
}


def _given(ctx: typer.Context, field: str) -> bool:
    """Whether a flag of the recipe field was given (not left at its default)."""
    return any(
        ctx.get_parameter_source(name)
        not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
        for name in _FIELD_FLAGS.get(field, (field,))
    )


def _executor(name: str, address: str | None) -> Executor | None:
    """None (serial), a ProcessExecutor or a RayExecutor; one-line errors for a bad choice."""
    if name == "ray":
        from aecompress.cluster import RayExecutor

        return RayExecutor(address)
    if name not in ("serial", "process"):
        raise AecompressError(f"--executor must be serial, process or ray (got '{name}')")
    if address is not None:
        raise AecompressError("--address needs --executor ray")
    if name == "process":
        from aecompress.cluster import ProcessExecutor

        return ProcessExecutor()
    return None


@app.command()
def report(
    results: Annotated[
        list[Path], typer.Argument(help="results JSONL files of a sweep (e.g. one per shard)")
    ],
) -> None:
    """Write Markdown/CSV tables and PNG plots next to the first results file; several files
    (a sweep's shards) are merged, a later file's record of a cell superseding an earlier's."""
    _starting(f"report of {', '.join(map(str, results))}")
    from aecompress.report import write_report
    from aecompress.sweep import read_results

    for path in results:
        if not path.is_file():
            raise AecompressError(f"no such results file: {path}")
    records = [record for path in results for record in read_results(path)]
    if not records:
        raise AecompressError(f"{', '.join(map(str, results))} holds no sweep records")
    for written in write_report(results, records):
        typer.echo(f"wrote {written}")


def _fail(message: str) -> NoReturn:
    """Print one `aecompress: error:` line (whatever the message's line breaks, at most
    MAX_ERROR characters of it: a message never floods the terminal with a value) and exit 2."""
    line = " ".join(message.split())
    line = line if len(line) <= MAX_ERROR else f"{line[: MAX_ERROR - 3]}..."
    typer.echo(f"aecompress: error: {line}", err=True)
    sys.exit(2)


def _usage_error(error: ClickException) -> str:
    ctx = getattr(error, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return error.format_message() + hint


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2, Ctrl-C exits 130."""
    map_large_allocations()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # no bars of the libraries in a log (tqdm reads it on import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        # not standalone: errors reach this function; typer returns 130 on KeyboardInterrupt
        code = app(standalone_mode=False)
    except AecompressError as error:
        _fail(str(error))
    except OSError as error:  # the environment: permissions, a full disk, a vanished file
        _fail(str(error))
    except ClickException as error:  # command-line usage
        _fail(_usage_error(error))
    except KeyboardInterrupt:
        code = INTERRUPTED
    if code == INTERRUPTED:
        typer.echo("aecompress: interrupted", err=True)
    sys.exit(code or 0)
