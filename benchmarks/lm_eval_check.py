"""Our multiple-choice accuracy against lm-eval-harness's on the same items and model.

    PYTHONPATH=src python benchmarks/lm_eval_check.py [MODEL_OR_ARTIFACT] [--task arc-easy]
        [--limit 50] [--out benchmarks/results/lm_eval_check.md] [--quick: the first 4 items]

Default: the dense SmolLM2-135M on the first 50 ARC-Easy test questions. Writes a Markdown
report (date, machine, command, wall time) and prints it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import Stopwatch, markdown_table, provenance, utc_now, write_text

from aecompress.integrations.lm_eval import LOCAL_TASKS, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--task", default="arc-easy", choices=sorted(LOCAL_TASKS))
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_eval_check.md"))
    parser.add_argument("--quick", action="store_true", help="smoke test: the first 4 items")
    args = parser.parse_args()
    if args.quick:
        args.limit = 4
    started, clock = utc_now(), Stopwatch()
    found = compare(args.model, args.task, limit=args.limit)
    rows = [
        (f"aecompress `evaluate --task {args.task}`", found["ours"]),
        (f"lm-eval {LOCAL_TASKS[args.task]}", found["lm_eval"]),
    ]
    lines = [
        f"# {args.task}: aecompress against lm-eval-harness",
        "",
        *provenance(started),
        f"- wall time: {clock.seconds():.0f} s (the model load and both runs)",
        "",
        f"Model `{args.model}`, the first {found['items']} items of `{args.task}` "
        f"(lm-eval task `{LOCAL_TASKS[args.task]}`, zero-shot, no special tokens added).",
        "",
        *markdown_table(
            ["", "acc", "acc_norm"],
            [(name, f"{m['acc']:.2f}", f"{m['acc_norm']:.2f}") for name, m in rows],
        ),
        "",
        f"Same prompts and continuations: {found['same_prompts']}; largest difference of a "
        f"choice's log-likelihood: {found['max_loglikelihood_difference']:.2e}.",
        "",
    ]
    print("\n".join(lines))
    write_text(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
