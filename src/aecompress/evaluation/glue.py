"""GLUE: fine-tune an encoder with a new head on a task's train split, score its dev split.

The encoder (the model's base model, whatever modules it holds, e.g. compressed ones) is
copied, every nn.Parameter of the copy is trained (AdamW, linear warmup then linear decay,
gradient clipping at 1.0, dropout on), and a dropout + Linear head reads its pooled output:
the model's own pooler (as AutoModelForSequenceClassification does for BERT) when it has
one, else [CLS], or `pooling` = "cls" / "mean". Metrics as GLUE defines them, x100: MRPC
accuracy and F1, STS-B Pearson and Spearman (regression, MSE loss), CoLA Matthews, RTE and
SST-2 accuracy. Defaults follow the paper: 3 epochs, lr 2e-5, batch 32 x 2 accumulation
steps, max length 128. The given model is left untouched.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)

from aecompress.data import data_file
from aecompress.errors import AecompressError
from aecompress.evaluation.common import (
    POOLING_MODES,
    length_batches,
    pad,
    pad_batch,
    pad_token_id,
    pool,
)
from aecompress.evaluation.kinds import require
from aecompress.evaluation.metrics import METRICS
from aecompress.models import check_positions

Batch = dict[str, torch.Tensor]


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


@dataclass
class Examples:
    features: list[dict[str, list[int]]]  # input_ids (and token_type_ids if the model uses them)
    labels: np.ndarray  # class indices, or float scores for regression


def read_examples(
    spec: GlueTask, path: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Examples:
    """Tokenised examples of a GLUE tsv file (truncated to max_length, not padded)."""
    lines = data_file(path).read_text(encoding="utf-8-sig").splitlines()
    rows = [line.split("\t") for line in lines[1 if spec.header else 0 :] if line]
    texts = [[row[c] for row in rows] for c in spec.text_columns]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    names = [n for n in ("input_ids", "token_type_ids") if n in encoded]
    features = [{n: encoded[n][i] for n in names} for i in range(len(rows))]
    raw = [row[spec.label_column] for row in rows]
    if spec.labels is None:
        return Examples(features, np.array([float(y) for y in raw], dtype=np.float32))
    return Examples(features, np.array([spec.labels.index(y) for y in raw]))


def collate(features: list[dict[str, list[int]]], pad_id: int) -> Batch:
    input_ids, mask = pad_batch([f["input_ids"] for f in features], pad_id)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = pad([f["token_type_ids"] for f in features], 0)
    return batch


class SequenceClassifier(nn.Module):
    """An encoder (with its config) and a dropout + Linear head on its pooled output."""

    def __init__(
        self, encoder: nn.Module, config: PretrainedConfig, outputs: int, pooling: str = "auto"
    ) -> None:
        super().__init__()
        if pooling not in ("auto", *POOLING_MODES):
            raise AecompressError(f"unknown pooling '{pooling}': auto, {', '.join(POOLING_MODES)}")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(
            getattr(config, "classifier_dropout", None) or config.hidden_dropout_prob
        )
        self.head = nn.Linear(config.hidden_size, outputs)
        nn.init.normal_(self.head.weight, std=config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        out = self.encoder(**batch)
        pooler = getattr(out, "pooler_output", None)
        if self.pooling == "auto":
            pooled = pooler if pooler is not None else out.last_hidden_state[:, 0]
        else:
            pooled = pool(out.last_hidden_state, batch["attention_mask"], self.pooling)
        return self.head(self.dropout(pooled))


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def finetune(
    classifier: SequenceClassifier,
    train: Examples,
    *,
    pad_id: int,
    epochs: int,
    lr: float,
    batch_size: int,
    grad_accum: int,
    warmup_ratio: float,
    seed: int,
    progress: bool,
) -> None:
    """Train every parameter of the classifier in place on shuffled mini-batches."""
    batches_per_epoch = math.ceil(len(train.features) / batch_size)
    total_steps = epochs * math.ceil(batches_per_epoch / grad_accum)
    classifier.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr)
    schedule = get_linear_schedule_with_warmup(
        optimizer, round(warmup_ratio * total_steps), total_steps
    )
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total_steps, desc="fine-tune", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(train.features), generator=generator).tolist()
        for number, start in enumerate(range(0, len(order), batch_size), start=1):
            chosen = order[start : start + batch_size]
            logits = classifier(collate([train.features[i] for i in chosen], pad_id))
            loss = _loss(logits, torch.as_tensor(train.labels[chosen]))
            (loss / grad_accum).backward()
            if number % grad_accum == 0 or number == batches_per_epoch:
                nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    classifier.eval()


@torch.inference_mode()
def predict(
    classifier: SequenceClassifier, examples: Examples, *, pad_id: int, batch_size: int
) -> np.ndarray:
    """Predicted class indices, or scores for a one-output (regression) head."""
    classifier.eval()
    out = np.zeros(len(examples.features), dtype=examples.labels.dtype)
    lengths = [len(f["input_ids"]) for f in examples.features]
    for batch in length_batches(lengths, batch_size):
        logits = classifier(collate([examples.features[i] for i in batch], pad_id))
        out[batch] = (logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).numpy()
    return out


def _subset(examples: Examples, fraction: float) -> Examples:
    """A random `fraction` of the examples (at least one), drawn from torch's global RNG."""
    keep = torch.randperm(len(examples.labels))[: max(1, round(fraction * len(examples.labels)))]
    return Examples([examples.features[i] for i in keep], examples.labels[keep.numpy()])


def glue(
    task: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    epochs: int = 3,
    lr: float = 2e-5,
    batch_size: int = 32,
    grad_accum: int = 2,
    max_length: int = 128,
    warmup_ratio: float = 0.1,
    train_fraction: float = 1.0,
    seed: int = 0,
    pooling: str = "auto",
    progress: bool = True,
) -> dict[str, float]:
    """Fine-tune a copy of the model on the train split (or a seeded random
    `train_fraction` of it) and report the dev metrics."""
    require(f"glue-{task}", model)
    if not 0 < train_fraction <= 1:
        raise AecompressError("train_fraction must be in (0, 1]")
    check_positions(model, max_length, "max_length")
    spec = GLUE_TASKS[task]
    train_path, dev_path = spec.files
    train = read_examples(spec, train_path, tokenizer, max_length)
    dev = read_examples(spec, dev_path, tokenizer, max_length)
    pad_id = pad_token_id(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        train = _subset(train, train_fraction)
        outputs = 1 if spec.labels is None else len(spec.labels)
        classifier = SequenceClassifier(
            copy.deepcopy(model.base_model), model.config, outputs, pooling
        )
        finetune(
            classifier,
            train,
            pad_id=pad_id,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            warmup_ratio=warmup_ratio,
            seed=seed,
            progress=progress,
        )
    predicted = predict(classifier, dev, pad_id=pad_id, batch_size=batch_size)
    return {name: METRICS[name](predicted, dev.labels) for name in spec.metrics}
