"""Our multiple-choice accuracy against lm-eval-harness's on the same items and model.

    PYTHONPATH=src python benchmarks/lm_eval_check.py [MODEL_OR_ARTIFACT] [--task arc-easy]
        [--limit 50] [--out benchmarks/results/lm_eval_check.md]

Default: the dense SmolLM2-135M on the first 50 ARC-Easy test questions. Writes a Markdown
report (date, machine, command, wall time) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from aecompress.integrations.lm_eval import LOCAL_TASKS, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--task", default="arc-easy", choices=sorted(LOCAL_TASKS))
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_eval_check.md"))
    args = parser.parse_args()
    start = time.perf_counter()
    found = compare(args.model, args.task, limit=args.limit)
    seconds = time.perf_counter() - start
    rows = [
        (f"aecompress `evaluate --task {args.task}`", found["ours"]),
        (f"lm-eval {LOCAL_TASKS[args.task]}", found["lm_eval"]),
    ]
    text = (
        f"# {args.task}: aecompress against lm-eval-harness\n\n"
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads ({platform.platform()}); "
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} "
        f"PYTHONPATH=src python {' '.join(sys.argv)}`; {seconds:.0f} s wall (the model load "
        f"and both runs; load average {os.getloadavg()[0]:.1f}: other processes shared the "
        "cores).\n\n"
        f"Model `{args.model}`, the first {found['items']} items of `{args.task}` "
        f"(lm-eval task `{LOCAL_TASKS[args.task]}`, zero-shot, no special tokens added).\n\n"
        "| | acc | acc_norm |\n|---|---|---|\n"
        + "".join(f"| {name} | {m['acc']:.2f} | {m['acc_norm']:.2f} |\n" for name, m in rows)
        + "\n"
        f"Same prompts and continuations: {found['same_prompts']}; largest difference of a "
        f"choice's log-likelihood: {found['max_loglikelihood_difference']:.2e}.\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
