"""Scale benchmark (issues 11 and 24): peak RSS and wall time of compressing a random Llama
of the TinyLlama-1.1B shape (fp32, 4.4 GB) or the Llama-2-7B shape (bf16, 13.5 GB at 32
layers), every linear layer at ratio 1.25 through the sequential pipeline, in memory or
streamed block by block from disk; beside each run, the peak that `compress --dry-run`
expects. Targets: TinyLlama shape in memory <= 1.3 x its fp32 bytes (issue 11), streamed
<= 0.35 x; the 7B shape streamed <= 4 GB at 32 layers and within 10% of 2 layers (issue 24).

    PYTHONPATH=src python benchmarks/scale.py                  # TinyLlama shape, 22 layers
    PYTHONPATH=src python benchmarks/scale.py --layers 2 --calibration-samples 4  # reduced
    PYTHONPATH=src python benchmarks/scale.py --shape llama2-7b --layers 32 --stream \\
        --methods sparsegpt --calibration-samples 8 --checkpoint /work/scratch/llama2-7b
    PYTHONPATH=src python benchmarks/scale.py --quick --out /tmp/scale  # a tiny shape: smoke test

The checkpoint is written as a sharded safetensors folder, one shard per layer (generated
and written layer by layer: writing never holds the model), with the MiniLM tokenizer
(its ids < 30522 < the vocabulary: calibration text). With --checkpoint it is written once
(at the deepest depth asked for) and reused: a shallower model is a folder of its own
config and index whose shards are links to the deeper one's first layers.
Each compress runs as `aecompress compress` in its own process; its peak RSS is that
process's ru_maxrss (the figure `/usr/bin/time -v` reports as maximum resident set size).
Writes scale[-SHAPE][-LAYERSl][-stream][-reduced|-quick].json and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
from common import machine, run_process, utc_now, write_text

TARGETS = "q,k,v,o,up,gate,down"
TINYLLAMA = {  # TinyLlama-1.1B's shape
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
LLAMA2_7B = {  # Llama-2-7B's shape
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
# --quick: the same steps on a tiny shape, in seconds (a smoke test, not a result)
TINY = TINYLLAMA | {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SHAPES = {  # name -> (shape, full depth, checkpoint dtype)
    "tinyllama": (TINYLLAMA, 22, "float32"),
    "llama2-7b": (LLAMA2_7B, 32, "bfloat16"),
}
INIT_STD = 0.02  # transformers' initializer_range: weights ~ N(0, 0.02^2), norms 1
COMPRESS = "import sys; from aecompress.cli import main; sys.argv[0] = 'aecompress'; main()"
IMPORTS = "import torch, transformers, aecompress.engine, aecompress.cli"  # a process's floor
TOTAL_ROW = re.compile(r"^\| \*\*total\*\* \| (.*) \|$", re.MULTILINE)


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _layer_prefix(key: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return None if match is None else int(match.group(1))


def write_checkpoint(
    folder: Path, shape: dict[str, Any], layers: int, dtype: str, seed: int = 0
) -> int:
    """A random Llama of `shape` with `layers` layers as a sharded safetensors folder in
    `dtype` (one shard per layer, the last one the tensors outside the layers), config and
    tokenizer; each layer generated (seeded by its index) and written before the next.
    Returns the weights' bytes."""
    import torch
    import transformers

    from aecompress.models import resolve_embedded
    from aecompress.tensorfile import write_safetensors

    config = transformers.LlamaConfig(
        num_hidden_layers=layers, dtype=dtype, architectures=["LlamaForCausalLM"], **shape
    )
    with torch.device("meta"):
        names = transformers.LlamaForCausalLM(config).state_dict()
    stored = getattr(torch, dtype)
    parts: list[dict[str, torch.Size]] = [{} for _ in range(layers + 1)]
    for key, tensor in names.items():
        layer = _layer_prefix(key)
        parts[layers if layer is None else layer][key] = tensor.shape
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for index, part in enumerate(parts):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        tensors = {
            key: torch.empty(size, dtype=stored).normal_(0, INIT_STD, generator=generator)
            if len(size) > 1
            else torch.ones(size, dtype=stored)
            for key, size in part.items()
        }
        name = shard_name(index, len(parts))
        write_safetensors(folder / name, tensors, stored, {"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    _write_index(folder, weight_map, total)
    config.save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(resolve_embedded("minilm-l6")))
    tokenizer.save_pretrained(folder)
    return total


def _write_index(folder: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def shallower(deep: Path, folder: Path, layers: int) -> int:
    """A `layers`-layer view of the checkpoint in `deep`: its own config and index, its
    shards links to `deep`'s first layers and to the tensors outside the layers. Returns
    the view's weights' bytes."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(deep)
    if layers > config.num_hidden_layers:
        raise SystemExit(f"{deep} has {config.num_hidden_layers} layers, not {layers}")
    deep_map = json.loads((deep / "model.safetensors.index.json").read_text())["weight_map"]
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, linked = {}, {}
    for key, source in deep_map.items():
        layer = _layer_prefix(key)
        if layer is not None and layer >= layers:
            continue
        name = shard_name(layers if layer is None else layer, layers + 1)
        linked[name] = deep / source
        weight_map[key] = name
    for name, source in linked.items():
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(source.resolve())
    total = sum(source.stat().st_size for source in linked.values())
    _write_index(folder, weight_map, total)
    config.num_hidden_layers = layers
    config.save_pretrained(folder)
    for tokenizer_file in deep.glob("*token*"):
        if tokenizer_file.is_file():
            (folder / tokenizer_file.name).write_bytes(tokenizer_file.read_bytes())
    return total


def checkpoint(root: Path, shape: dict[str, Any], layers: int, dtype: str) -> Path:
    """The checkpoint of `layers` layers under `root`: the deepest one written there (once)
    or a shallower view of it."""
    deep = next(
        (
            folder
            for folder in sorted(root.glob("layers-*"), key=lambda f: -int(f.name[7:]))
            if not (folder / "view").exists() and int(folder.name[7:]) >= layers
        ),
        None,
    )
    folder = root / f"layers-{layers}"
    if deep is None:
        write_checkpoint(folder, shape, layers, dtype)
    elif deep != folder:
        shallower(deep, folder, layers)
        (folder / "view").write_text(f"{deep}\n")
    return folder


def measured(command: list[str], env: dict[str, str], capture: bool = False) -> dict[str, Any]:
    """Run `command`; its wall time and peak RSS (of that process alone), or an error."""
    finished = run_process(command, env, capture=capture)
    if finished.returncode:
        detail = f": {finished.last_line('stderr')}" if capture else ""
        raise SystemExit(f"{' '.join(command[:4])}... failed ({finished.returncode}){detail}")
    step: dict[str, Any] = {"seconds": finished.seconds, "peak_rss_bytes": finished.peak_rss_bytes}
    if capture:
        step["stdout"] = finished.stdout
    return step


def expected_peaks(dry_run: str) -> dict[str, float]:
    """The totals of `compress --dry-run`'s table, GiB by path (in memory, streamed)."""
    header = next(line for line in dry_run.splitlines() if line.startswith("| part |"))
    paths = [cell.strip() for cell in header.strip("|").split("|")[1:]]
    match = TOTAL_ROW.search(dry_run)
    if match is None:
        raise SystemExit(f"no total in the dry run's output:\n{dry_run}")
    totals = [float(cell.strip(" *").split()[0]) for cell in match.group(1).split("|")]
    return dict(zip(paths, totals, strict=True))


def run(
    model: Path,
    methods: list[str],
    calibration: dict[str, int],
    stream: bool,
    windows: int,
    work: Path,
) -> dict[str, Any]:
    """Compress `model` with each method (each step measured, beside its dry run's
    estimate), then evaluate the last artifact on `windows` perplexity windows."""
    env = {**os.environ, "AECOMPRESS_CACHE": str(work / "cache")}
    steps = {"imports": measured([sys.executable, "-c", IMPORTS], env)}
    path = "streamed" if stream else "in memory"
    for method in methods:
        recipe = work / f"{method}.yaml"
        fields = {
            "model": str(model),
            "method": method,
            "ratio": 1.25,
            "targets": TARGETS,
            "pipeline": "sequential",
            "calibration": calibration,
        }
        recipe.write_text(json.dumps(fields))  # JSON is YAML
        compress = [sys.executable, "-c", COMPRESS, "compress", str(model), "--recipe"]
        compress += [str(recipe), "-o", str(work / method), "--overwrite"]
        compress += ["--stream"] if stream else []
        dry = measured([*compress, "--dry-run"], env, capture=True)
        steps[method] = measured(compress, env) | {
            "estimated_gib": expected_peaks(dry["stdout"])[path],
            "estimates_gib": expected_peaks(dry["stdout"]),
        }
    if windows:
        evaluate = [sys.executable, "-c", COMPRESS, "evaluate", str(work / methods[-1])]
        evaluate += ["--task", "wikitext2", "--windows", str(windows), "--seq-len", "256"]
        steps["evaluate"] = measured([*evaluate, "--no-dense"], env)
    return steps


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _variant(facts: dict[str, Any]) -> str:
    if facts.get("quick"):
        return " (quick: a tiny shape, a smoke test, not a result)"
    return " (reduced)" if facts["reduced"] else ""


def markdown(facts: dict[str, Any]) -> str:
    gib = 2**30
    path = "streamed from disk" if facts.get("stream") else "in memory"
    lines = [
        f"# Scale benchmark{_variant(facts)}",
        "",
        f"{facts['date']} on {facts['machine']}; command: `{facts['command']}`.",
        f"Random Llama of the {facts['shape']} shape with {facts['layers']} layers "
        f"({facts['dtype']} checkpoint; fp32 weights {facts['fp32_bytes'] / gib:.2f} GiB), "
        f"all linear layers ({TARGETS}) at ratio 1.25, sequential pipeline, {path}, "
        f"{facts['calibration_samples']} calibration windows of {facts['seq_len']} tokens. "
        "Peak RSS: each step's own process; imports: a process that only imports torch, "
        "transformers and aecompress; estimated: the total of `compress --dry-run` for the "
        "path taken.",
        "",
        "| step | wall time (s) | peak RSS (GiB) | estimated peak (GiB) | estimated / measured "
        "| peak RSS / fp32 model bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, step in facts["steps"].items():
        peak, estimate = step["peak_rss_bytes"] / gib, step.get("estimated_gib")
        ratio = step["peak_rss_bytes"] / facts["fp32_bytes"] if estimate is not None else None
        lines.append(
            f"| {name} | {step['seconds']:.1f} | {peak:.2f} | {_number(estimate)} | "
            f"{_number(None if estimate is None else estimate / peak)} | {_number(ratio)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--methods", default="svdllm,sparsegpt", help="comma-separated")
    parser.add_argument("--stream", action="store_true", help="compress streamed from disk")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    parser.add_argument("--checkpoint", type=Path, help="folder to keep checkpoints in")
    parser.add_argument("--perplexity-windows", type=int, default=0, help="evaluate after")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, 2 layers: smoke test")
    args = parser.parse_args()
    shape, depth, dtype = SHAPES[args.shape]
    layers = args.layers or depth
    if args.quick:
        shape, layers, args.calibration_samples, args.seq_len = TINY, 2, 2, 16
    calibration = {
        "samples": args.calibration_samples,
        "seq_len": args.seq_len,
        "batch_size": min(args.calibration_samples, 8),
    }
    with tempfile.TemporaryDirectory(prefix="aecompress-scale-") as work:
        root = args.checkpoint or Path(work) / "checkpoint"
        model = checkpoint(root / f"{args.shape}-{dtype}", shape, layers, dtype)
        written = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        methods = args.methods.split(",")
        steps = run(model, methods, calibration, args.stream, args.perplexity_windows, Path(work))
    numbers = sum(_parameter_numbers(shape, layers))
    reduced = layers != depth or args.calibration_samples != 64 or args.seq_len != 256
    facts = {
        "steps": steps,
        "fp32_bytes": numbers * 4,
        "writer_peak_rss_bytes": written,
        "reduced": reduced and args.shape == "tinyllama",
        "quick": args.quick,
        "stream": args.stream,
        "shape": f"hidden {shape['hidden_size']}" if args.quick else args.shape,
        "dtype": dtype,
        "layers": layers,
        "calibration_samples": args.calibration_samples,
        "seq_len": args.seq_len,
        "date": utc_now(),
        "machine": f"{machine()}, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "command": " ".join(["python", *sys.argv]),
    }
    write_results(args.out, facts)


def _parameter_numbers(shape: dict[str, Any], layers: int) -> list[int]:
    """Numbers of every parameter of the Llama (from its shapes alone)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=layers, **shape)
    with torch.device("meta"):
        return [p.numel() for p in transformers.LlamaForCausalLM(config).parameters()]


def write_results(out: Path, facts: dict[str, Any]) -> None:
    variant = "-quick" if facts["quick"] else "-reduced" if facts["reduced"] else ""
    shape = "" if facts["shape"] == "tinyllama" or facts["quick"] else f"-{facts['shape']}"
    depth = f"-{facts['layers']}l" if shape else ""
    stem = out / f"scale{shape}{depth}{'-stream' if facts['stream'] else ''}{variant}"
    write_text(stem.with_suffix(".json"), json.dumps(facts, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), markdown(facts))
    print(markdown(facts), end="")


if __name__ == "__main__":
    main()
