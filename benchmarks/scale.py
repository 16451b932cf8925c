"""Scale benchmark (issue 11): peak RSS and wall time of compressing a random Llama of the
TinyLlama-1.1B shape (fp32, about 4.4 GB), every linear layer at ratio 1.25, with svdllm and
sparsegpt through the sequential pipeline; target peak RSS <= 1.3 x the fp32 model's bytes.

    PYTHONPATH=src python benchmarks/scale.py                  # the full model (22 layers)
    PYTHONPATH=src python benchmarks/scale.py --layers 2 --calibration-samples 4  # reduced
    PYTHONPATH=src python benchmarks/scale.py --quick --out /tmp/scale  # a tiny shape: smoke test

Each step runs as `aecompress compress` in its own process (the model is written first by
another one, built in place: no second copy); its peak RSS is that process's ru_maxrss.
Writes scale[-reduced|-quick].json and .md (date, machine, command) into --out.

Not a sweep recipe: the model is built for the run, nothing is evaluated, and the figures
are each process's peak RSS against the model's bytes and an imports-only process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
from common import machine, run_process, utc_now, write_text

METHODS = ("svdllm", "sparsegpt")
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
# --quick: the same steps on a tiny shape, in seconds (a smoke test, not a result)
TINY = TINYLLAMA | {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
BUILD = """
import sys, torch, transformers
from aecompress.models import resolve_embedded
config = transformers.LlamaConfig(num_hidden_layers=int(sys.argv[2]), **{config})
torch.manual_seed(0)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])  # fp32, built in place
tokenizer = transformers.AutoTokenizer.from_pretrained(str(resolve_embedded("minilm-l6")))
tokenizer.save_pretrained(sys.argv[1])  # ids < 30522 < the vocabulary: calibration text
"""
COMPRESS = "import sys; from aecompress.cli import main; sys.argv[0] = 'aecompress'; main()"
IMPORTS = "import torch, transformers, aecompress.engine, aecompress.cli"  # a process's floor


def measured(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run `command`; its wall time and peak RSS (of that process alone), or an error."""
    finished = run_process(command, env, capture=False)
    if finished.returncode:
        raise SystemExit(f"{' '.join(command[:4])}... failed ({finished.returncode})")
    return {"seconds": finished.seconds, "peak_rss_bytes": finished.peak_rss_bytes}


def run(
    shape: dict[str, Any], layers: int, samples: int, seq_len: int, work: Path
) -> dict[str, Any]:
    """Build the model, then compress it with each method; every step measured."""
    env = {**os.environ, "AECOMPRESS_CACHE": str(work / "cache")}
    model = work / "model"
    build = [sys.executable, "-c", BUILD.format(config=shape), str(model), str(layers)]
    steps = {"imports": measured([sys.executable, "-c", IMPORTS], env)}
    steps["build"] = measured(build, env)
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    for method in METHODS:
        recipe = work / f"{method}.yaml"
        calibration = {"samples": samples, "seq_len": seq_len, "batch_size": min(samples, 8)}
        recipe.write_text(
            json.dumps(  # JSON is YAML
                {
                    "model": str(model),
                    "method": method,
                    "ratio": 1.25,
                    "targets": TARGETS,
                    "pipeline": "sequential",
                    "calibration": calibration,
                }
            )
        )
        compress = [sys.executable, "-c", COMPRESS, "compress", str(model), "--recipe"]
        steps[method] = measured([*compress, str(recipe), "-o", str(work / method)], env)
        peak, floor = steps[method]["peak_rss_bytes"], steps["imports"]["peak_rss_bytes"]
        steps[method] |= {
            "rss_over_model": peak / model_bytes,
            "rss_above_imports_over_model": (peak - floor) / model_bytes,
        }
    return {"model_bytes": model_bytes, "steps": steps}


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _variant(facts: dict[str, Any]) -> str:
    if facts.get("quick"):
        return " (quick: a tiny shape, a smoke test, not a result)"
    return " (reduced)" if facts["reduced"] else ""


def markdown(facts: dict[str, Any]) -> str:
    gib = 2**30
    lines = [
        f"# Scale benchmark{_variant(facts)}",
        "",
        f"{facts['date']} on {facts['machine']}; command: `{facts['command']}`.",
        f"Random Llama of the {facts.get('shape', 'TinyLlama-1.1B')} shape with "
        f"{facts['layers']} layers "
        f"(fp32 weights {facts['model_bytes'] / gib:.2f} GiB), all linear layers "
        f"({TARGETS}) at ratio 1.25, sequential pipeline, {facts['calibration_samples']} "
        f"calibration windows of {facts['seq_len']} tokens. Peak RSS: each step's own process; "
        "imports: a process that only imports torch, transformers and aecompress.",
        "",
        "| step | wall time (s) | peak RSS (GiB) | peak RSS / fp32 model bytes | <= 1.3 "
        "| (peak RSS - imports) / model bytes |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, step in facts["steps"].items():
        ratio, above = step.get("rss_over_model"), step.get("rss_above_imports_over_model")
        verdict = "" if ratio is None else ("yes" if ratio <= 1.3 else "no")
        lines.append(
            f"| {name} | {step['seconds']:.1f} | {step['peak_rss_bytes'] / gib:.2f} | "
            f"{_number(ratio)} | {verdict} | {_number(above)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (TinyLlama: 22)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, 2 layers: smoke test")
    args = parser.parse_args()
    shape = TINY if args.quick else TINYLLAMA
    if args.quick:
        args.layers, args.calibration_samples, args.seq_len = 2, 2, 16
    with tempfile.TemporaryDirectory(prefix="aecompress-scale-") as work:
        facts = run(shape, args.layers, args.calibration_samples, args.seq_len, Path(work))
    reduced = args.layers != 22 or args.calibration_samples != 64 or args.seq_len != 256
    facts |= {
        "reduced": reduced,
        "quick": args.quick,
        "shape": f"hidden {shape['hidden_size']}" if args.quick else "TinyLlama-1.1B",
        "layers": args.layers,
        "calibration_samples": args.calibration_samples,
        "seq_len": args.seq_len,
        "date": utc_now(),
        "machine": f"{machine()}, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "command": " ".join(["python", *sys.argv]),
    }
    stem = args.out / f"scale{'-quick' if args.quick else '-reduced' if reduced else ''}"
    write_text(stem.with_suffix(".json"), json.dumps(facts, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), markdown(facts))
    print(markdown(facts), end="")


if __name__ == "__main__":
    main()
