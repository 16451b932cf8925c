"""Choose GLUE fine-tuning's learning rate on the dense model, on held-out training data.

For each task, the dense model is fine-tuned at each learning rate of a small grid on its
training set less a seeded 10% (task option split=heldout) and scored on that 10%; the
dev set is never read. The rate with the best first metric of the task (MRPC accuracy,
RTE accuracy, STS-B Pearson) is chosen, once per task, and fixed for every cell of
recipes/glue-selected.yaml, which reports dev. One JSON line per (task, rate) in
`--results` (a re-run skips those done), then selection.md beside it.

    OMP_NUM_THREADS=1 python benchmarks/glue_select.py \
        --results benchmarks/results/glue-finetune/selection.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import markdown_table, provenance, utc_now, write_text

from aecompress.evaluation.tasks import TASKS, run_task
from aecompress.models import load_model

TASK_NAMES = ("glue-mrpc", "glue-rte", "glue-stsb")
RATES = (2e-5, 5e-5, 1e-4, 2e-4)


def done(results: Path) -> dict[tuple[str, float], dict]:
    """The results already in the file, by (task, learning rate)."""
    if not results.exists():
        return {}
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["task"], r["settings"]["lr"]): r for r in records}


def chosen(records: dict[tuple[str, float], dict], task: str) -> float:
    """The learning rate whose held-out first metric is best."""
    metric = TASKS[task].metrics[0]
    scored = {lr: r["metrics"][metric] for (name, lr), r in records.items() if name == task}
    return max(scored, key=lambda lr: scored[lr])


def report(records: dict[tuple[str, float], dict], tasks: list[str], started: str) -> str:
    rows = []
    for task in tasks:
        best = chosen(records, task)
        for (name, lr), record in sorted(records.items()):
            if name == task:
                metrics = ", ".join(f"{k} {v:.2f}" for k, v in record["metrics"].items())
                rows.append((task, f"{lr:g}", metrics, "**chosen**" if lr == best else ""))
    lines = [
        "# GLUE fine-tuning: learning rate chosen on held-out training data (dense model)",
        "",
        "all-MiniLM-L6-v2, fine-tuned on each task's training set less a seeded 10% "
        "(`split: heldout`, `heldout: 0.1`, `heldout_seed: 0`) and scored on that 10%; the "
        "dev set is never read here. The best first metric chooses the rate, which "
        "recipes/glue-selected.yaml then fixes for every cell (dense and compressed), "
        "reported on dev.",
        "",
        *markdown_table(("task", "lr", "held-out metrics", ""), rows),
        "",
        *provenance(started),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="JSON lines file")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    parser.add_argument("--train-fraction", type=float, default=1.0, help="(a quick check)")
    args = parser.parse_args()
    started = utc_now()
    dense = load_model(args.model)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    records = done(args.results)
    for task in args.tasks:
        for lr in args.rates:
            if (task, lr) in records:
                continue
            result = run_task(
                task,
                dense.model,
                dense.tokenizer,
                split="heldout",
                lr=lr,
                train_fraction=args.train_fraction,
            )
            line = result.to_json()
            with args.results.open("a") as handle:
                handle.write(line + "\n")
            records[(task, lr)] = json.loads(line)
            print(task, lr, result.metrics, flush=True)
    write_text(args.results.with_name("selection.md"), report(records, args.tasks, started))


if __name__ == "__main__":
    main()
