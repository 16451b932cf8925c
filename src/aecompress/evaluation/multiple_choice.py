"""Zero-shot multiple choice for causal LMs: ARC-Easy, PIQA, HellaSwag (lm-eval-harness style).

Each choice is scored by the sum of the log-probabilities of its continuation (" " + the
choice, lm-eval's target delimiter) tokens given the context. The continuation's tokens are
those of tokenize(context + continuation) after the context's tokens; no special tokens are
added. `acc` takes the best sum, `acc_norm` the best sum divided by the choice's length in
characters, delimiter excluded (lm-eval's acc_norm), both in percent, each with its
standard error (`acc_stderr`: lm-eval's mean_stderr of the items' 0/1 correctness). Prompts follow
lm-eval: ARC and PIQA "Question: {q}\\nAnswer:" + " {choice}",
HellaSwag "{activity}: {context}" + " {ending}" (the data file is already preprocessed the
lm-eval way, except that ctx_b is not capitalised: see data/hellaswag/SOURCE.md).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.data import CHOICE_FILES, data_file
from aecompress.errors import AecompressError
from aecompress.evaluation.common import (
    Forward,
    length_batches,
    model_logits,
    pad_batch,
    pad_token_id,
)
from aecompress.evaluation.kinds import require
from aecompress.evaluation.metrics import STDERR, mean_stderr
from aecompress.models import model_device
from aecompress.progress import progress_bar

DELIMITER = " "  # between context and choice (lm-eval's target_delimiter)


@dataclass(frozen=True)
class Item:
    context: str
    choices: list[str]  # the choices' texts; each continuation is DELIMITER + choice
    label: int


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _arc(paths: list[Path]) -> list[Item]:
    items = []
    for row in read_jsonl(paths[0]):
        choices = row["question"]["choices"]
        labels = [choice["label"] for choice in choices]
        items.append(
            Item(
                f"Question: {row['question']['stem']}\nAnswer:",
                [choice["text"] for choice in choices],
                labels.index(row["answerKey"]),
            )
        )
    return items


def _piqa(paths: list[Path]) -> list[Item]:
    labels = paths[1].read_text().split()
    return [
        Item(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(y))
        for row, y in zip(read_jsonl(paths[0]), labels, strict=True)
    ]


def _hellaswag(paths: list[Path]) -> list[Item]:
    """Six lines per item: context, gold index, four endings."""
    lines = paths[0].read_text(encoding="utf-8").splitlines()
    return [
        Item(lines[i], lines[i + 2 : i + 6], int(lines[i + 1])) for i in range(0, len(lines) - 5, 6)
    ]


@dataclass(frozen=True)
class ChoiceDataset:
    files: dict[str, tuple[str, ...]]  # split -> data files
    load: Callable[[list[Path]], list[Item]]


DATASETS: dict[str, ChoiceDataset] = {
    "arc-easy": ChoiceDataset(CHOICE_FILES["arc-easy"], _arc),
    "piqa": ChoiceDataset(CHOICE_FILES["piqa"], _piqa),
    "hellaswag": ChoiceDataset(CHOICE_FILES["hellaswag"], _hellaswag),
}


def load_items(dataset: str, split: str | None = None) -> list[Item]:
    """The items of a split; by default the one lm-eval reports (ARC-Easy test, PIQA and
    HellaSwag validation)."""
    files = DATASETS[dataset].files
    split = split or next(iter(files))
    if split not in files:
        raise AecompressError(f"{dataset} has no split '{split}': {', '.join(files)}")
    return DATASETS[dataset].load([data_file(f) for f in files[split]])


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """(context tokens, continuation tokens) of each (context, continuation) pair."""
    contexts = tokenizer([c for c, _ in pairs], add_special_tokens=False)["input_ids"]
    wholes = tokenizer([c + x for c, x in pairs], add_special_tokens=False)["input_ids"]
    encoded = []
    for context, whole in zip(contexts, wholes, strict=True):
        if len(whole) <= len(context):
            raise AecompressError("a continuation encodes to no tokens")
        encoded.append((context, whole[len(context) :]))
    return encoded


@torch.inference_mode()
def continuation_logprobs(
    model: PreTrainedModel,
    pairs: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    batch_size: int = 16,
    progress: bool = True,
    forward: Forward | None = None,
) -> list[float]:
    """Sum of log p(continuation token | previous tokens) for each (context, continuation);
    the logits come from `forward` (default: the model in memory, batch by batch).

    Sequences longer than the model's context keep their last tokens. When the model takes
    `logits_to_keep`, only the positions from the batch's first predicting one go through
    the LM head (a large share of the work for small models with big vocabularies).
    """
    model.eval()
    trim = "logits_to_keep" in inspect.signature(model.forward).parameters
    keep = model.config.max_position_embeddings + 1
    sequences = [(context + cont)[-keep:] for context, cont in pairs]
    scores = [0.0] * len(pairs)
    device = model_device(model)
    order = length_batches([len(s) for s in sequences], batch_size)
    batches, firsts = [], []
    for batch in order:
        ids, mask = pad_batch([sequences[i][:-1] for i in batch], pad_id, device)
        first = min(len(sequences[i]) - 1 - len(pairs[i][1]) for i in batch) if trim else 0
        kept = {"logits_to_keep": torch.arange(first, ids.shape[1], device=device)} if trim else {}
        batches.append({"input_ids": ids, "attention_mask": mask, **kept})
        firsts.append(first)
    logits_of = forward or model_logits(model)
    for batch, first, logits in progress_bar(
        zip(order, firsts, logits_of(batches), strict=True),
        desc="multiple choice",
        enabled=progress,
        total=len(order),
    ):
        for row, index in enumerate(batch):
            targets = torch.as_tensor(pairs[index][1], device=device)
            start = len(sequences[index]) - 1 - len(targets) - first
            window = logits[row, start : start + len(targets)].float().log_softmax(dim=-1)
            scores[index] = window.gather(1, targets[:, None]).sum().item()
    return scores


def multiple_choice(
    dataset: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    forward: Forward | None = None,
) -> dict[str, float]:
    """Accuracy and length-normalised accuracy on the first `limit` items of a split
    (default: see load_items); the logits from `forward` (default: the model in memory)."""
    require("causal-lm", model, dataset)
    items = load_items(dataset, split)[:limit]
    scores = continuation_logprobs(
        model,
        encode_pairs(tokenizer, choice_pairs(items)),
        pad_id=pad_token_id(tokenizer),
        batch_size=batch_size,
        progress=progress,
        forward=forward,
    )
    return accuracies(items, scores)


def choice_pairs(items: list[Item]) -> list[tuple[str, str]]:
    """(context, continuation) of every choice of every item, in order."""
    return [(item.context, DELIMITER + choice) for item in items for choice in item.choices]


def accuracies(items: list[Item], scores: list[float]) -> dict[str, float]:
    """acc and acc_norm (percent) from the log-likelihoods of choice_pairs(items), and their
    standard errors acc_stderr, acc_norm_stderr (lm-eval's; none for a single item)."""
    correct, correct_norm = np.zeros(len(items)), np.zeros(len(items))
    start = 0
    for number, item in enumerate(items):
        score = np.array(scores[start : start + len(item.choices)])
        chars = np.array([len(choice) for choice in item.choices])
        correct[number] = int(np.argmax(score)) == item.label
        correct_norm[number] = int(np.argmax(score / chars)) == item.label
        start += len(item.choices)
    found = {}
    for name, hits in (("acc", correct), ("acc_norm", correct_norm)):
        found[name] = 100.0 * float(hits.sum()) / len(items)
        stderr = mean_stderr(hits)
        if stderr is not None:
            found[name + STDERR] = 100.0 * stderr
    return found
