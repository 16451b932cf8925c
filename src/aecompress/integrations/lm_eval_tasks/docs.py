"""Documents of the local lm-eval tasks (the YAML files name these functions), read from
aecompress's data folder in the fields of lm-eval's hub datasets."""

from __future__ import annotations

from typing import Any

import datasets

from aecompress.data import data_file
from aecompress.evaluation.multiple_choice import DATASETS, load_items, read_jsonl


def _files(task: str, split: str) -> list[Any]:
    return [data_file(name) for name in DATASETS[task].files[split]]


def arc_easy(**_: Any) -> dict[str, datasets.Dataset]:
    """ARC-Easy rows as in allenai/ai2_arc: question, choices {text, label}, answerKey."""
    return {
        split: datasets.Dataset.from_list(
            [
                {
                    "question": row["question"]["stem"],
                    "choices": {
                        "text": [c["text"] for c in row["question"]["choices"]],
                        "label": [c["label"] for c in row["question"]["choices"]],
                    },
                    "answerKey": row["answerKey"],
                }
                for row in read_jsonl(_files("arc-easy", split)[0])
            ]
        )
        for split in ("test", "validation")
    }


def piqa(**_: Any) -> dict[str, datasets.Dataset]:
    """PIQA validation rows as in lm-eval's piqa: goal, sol1, sol2, label."""
    rows_file, labels_file = _files("piqa", "validation")
    labels = labels_file.read_text().split()
    rows = [
        {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)}
        for row, label in zip(read_jsonl(rows_file), labels, strict=True)
    ]
    return {"validation": datasets.Dataset.from_list(rows)}


def hellaswag(**_: Any) -> dict[str, datasets.Dataset]:
    """HellaSwag validation as lm-eval's process_docs leaves it: query, choices, label (the
    data file is already preprocessed that way; see data/hellaswag/SOURCE.md)."""
    rows = [
        {"query": item.context, "choices": item.choices, "label": item.label}
        for item in load_items("hellaswag", "validation")
    ]
    return {"validation": datasets.Dataset.from_list(rows)}
