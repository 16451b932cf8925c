"""Scale benchmark (issue 11): peak RSS and wall time of compressing a random Llama of the
TinyLlama-1.1B shape (fp32, about 4.4 GB), every linear layer at ratio 1.25, with svdllm and
sparsegpt through the sequential pipeline; target peak RSS <= 1.3 x the fp32 model's bytes.

    PYTHONPATH=src python benchmarks/scale.py                  # the full model (22 layers)
    PYTHONPATH=src python benchmarks/scale.py --layers 2 --calibration-samples 4  # reduced

Each step runs as `aecompress compress` in its own process (the model is written first by
another one, built in place: no second copy); its peak RSS is that process's ru_maxrss.
Writes scale[-reduced].json and .md (date, machine, command) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

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
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command[:4])}... failed ({process.returncode})")
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": usage.ru_maxrss * 1024}


def run(layers: int, samples: int, seq_len: int, work: Path) -> dict[str, Any]:
    """Build the model, then compress it with each method; every step measured."""
    env = {**os.environ, "AECOMPRESS_CACHE": str(work / "cache")}
    model = work / "model"
    build = [sys.executable, "-c", BUILD.format(config=TINYLLAMA), str(model), str(layers)]
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


def markdown(facts: dict[str, Any]) -> str:
    gib = 2**30
    lines = [
        f"# Scale benchmark{' (reduced)' if facts['reduced'] else ''}",
        "",
        f"{facts['date']} on {facts['machine']}; command: `{facts['command']}`.",
        f"Random Llama of the TinyLlama-1.1B shape with {facts['layers']} layers "
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aecompress-scale-") as work:
        facts = run(args.layers, args.calibration_samples, args.seq_len, Path(work))
    reduced = args.layers != 22 or args.calibration_samples != 64 or args.seq_len != 256
    facts |= {
        "reduced": reduced,
        "layers": args.layers,
        "calibration_samples": args.calibration_samples,
        "seq_len": args.seq_len,
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB ({platform.platform()}), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "command": " ".join(["python", *sys.argv]),
    }
    stem = args.out / f"scale{'-reduced' if reduced else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(facts))
    print(markdown(facts), end="")


if __name__ == "__main__":
    main()
