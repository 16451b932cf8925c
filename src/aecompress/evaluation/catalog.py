"""The evaluation tasks as data: the model each needs, its metrics and the data files of
each split. Imports nothing heavy, so that `aecompress tasks` and `evaluate --help` print
at once; tasks.py pairs each entry with the function that runs it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aecompress.data import WIKITEXT2_FILES

# What each task needs: "causal-lm", "masked-lm" or "encoder" (see kinds.py).
TASK_NEEDS: dict[str, str] = {
    "wikitext2": "causal-lm",
    "arc-easy": "causal-lm",
    "piqa": "causal-lm",
    "hellaswag": "causal-lm",
    "mlm": "masked-lm",
    "stsb": "encoder",
    "fidelity": "encoder",
    "glue-mrpc": "encoder",
    "glue-rte": "encoder",
    "glue-stsb": "encoder",
    "glue-sst2": "encoder",
    "glue-cola": "encoder",
    "glue-mrpc-probe": "encoder",
    "glue-rte-probe": "encoder",
    "glue-stsb-probe": "encoder",
    "glue-sst2-probe": "encoder",
    "glue-cola-probe": "encoder",
}

STSB_FILES = {
    "train": "stsb/sts-train.csv",
    "dev": "stsb/sts-dev.csv",
    "test": "stsb/sts-test.csv",
}

# multiple-choice data files by split; the first split is the one lm-eval reports
CHOICE_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "arc-easy": {
        "test": ("arc_easy/ARC-Easy-Test.jsonl",),
        "validation": ("arc_easy/ARC-Easy-Dev.jsonl",),
    },
    "piqa": {"validation": ("piqa/valid.jsonl", "piqa/valid-labels.lst")},
    "hellaswag": {"validation": ("hellaswag/hellaswag_val_full.txt",)},
}


@dataclass(frozen=True)
class GlueTask:
    folder: str
    text_columns: tuple[int, ...]
    label_column: int
    header: bool
    labels: tuple[str, ...] | None  # class names in index order; None for regression
    metrics: tuple[str, ...]

    @property
    def files(self) -> tuple[str, str]:
        return f"glue/{self.folder}/train.tsv", f"glue/{self.folder}/dev.tsv"


GLUE_TASKS: dict[str, GlueTask] = {
    "mrpc": GlueTask("MRPC", (3, 4), 0, True, ("0", "1"), ("accuracy", "f1")),
    "rte": GlueTask("RTE", (1, 2), 3, True, ("entailment", "not_entailment"), ("accuracy",)),
    "stsb": GlueTask("STS-B", (7, 8), 9, True, None, ("pearson", "spearman")),
    "sst2": GlueTask("SST-2", (0,), 1, True, ("0", "1"), ("accuracy",)),
    "cola": GlueTask("CoLA", (3,), 1, False, ("0", "1"), ("matthews",)),
}


@dataclass(frozen=True)
class TaskFacts:
    name: str
    metrics: tuple[str, ...]
    files: Mapping[str, tuple[str, ...]]  # split -> data files it reads; first = default split
    needs_reference: bool = False  # run also takes reference=<the dense model>

    @property
    def needs(self) -> str:
        """What the model must be: one of "causal-lm", "masked-lm", "encoder"."""
        return TASK_NEEDS[self.name]

    @property
    def split(self) -> str:
        return next(iter(self.files))


_WIKITEXT2 = {split: (WIKITEXT2_FILES[split],) for split in ("test", "validation", "train")}
_STSB = {split: (STSB_FILES[split],) for split in ("test", "dev", "train")}

TASK_FACTS: dict[str, TaskFacts] = {
    facts.name: facts
    for facts in [
        TaskFacts("wikitext2", ("perplexity",), _WIKITEXT2),
        TaskFacts("mlm", ("perplexity",), _WIKITEXT2),
        TaskFacts("stsb", ("spearman", "pearson"), _STSB),
        TaskFacts("fidelity", ("cosine",), {"dev": _STSB["dev"]}, True),
        *(TaskFacts(name, ("acc", "acc_norm"), files) for name, files in CHOICE_FILES.items()),
        *(TaskFacts(f"glue-{n}", s.metrics, {"dev": s.files}) for n, s in GLUE_TASKS.items()),
        *(TaskFacts(f"glue-{n}-probe", s.metrics, {"dev": s.files}) for n, s in GLUE_TASKS.items()),
    ]
}

PROBE_NOTE = (
    "glue-*-probe: a frozen-feature probe, not the paper's fine-tuning: a logistic (ridge for "
    "STS-B) head on the frozen encoder's mean-pooled features of at most max_train (4000) "
    "train examples, dev metric; `evaluate --probe` runs it for the glue-* tasks given."
)


def task_table() -> str:
    """Every task with the model it needs, its metrics and its splits (default first), as an
    aligned Markdown table."""
    rows = [("task", "model", "metrics", "split (others)")]
    for task in TASK_FACTS.values():
        others = [split for split in task.files if split != task.split]
        splits = task.split + (f" ({', '.join(others)})" if others else "")
        rows.append((task.name, task.needs, ", ".join(task.metrics), splits))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n\n" + PROBE_NOTE
