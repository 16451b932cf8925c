"""GLUE: fine-tune an encoder with a new head on a task's train split, score its dev split.

The encoder (the model's base model, whatever modules it holds, e.g. compressed ones) is
copied, every nn.Parameter of the copy is trained (AdamW, linear warmup then linear decay,
gradient clipping at 1.0, dropout on), and a dropout + Linear head reads its pooled output:
the model's own pooler (as AutoModelForSequenceClassification does for BERT) when it has
one, else [CLS], or `pooling` = "cls" / "mean". Metrics as GLUE defines them, x100: MRPC
accuracy and F1, STS-B Pearson and Spearman (regression, MSE loss), CoLA Matthews, RTE and
SST-2 accuracy. Defaults follow the paper: 3 epochs, lr 2e-5, batch 32 x 2 accumulation
steps, max length 128. The given model is left untouched.

`probe` is the cheap alternative (minutes instead of hours on a CPU), not the paper's
protocol: a linear head (logistic, or ridge for STS-B) fitted on the frozen encoder's
pooled features of the train split, scored on dev (see its docstring).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)

from aecompress.data import GLUE_TASKS, GlueTask, data_file
from aecompress.errors import AecompressError
from aecompress.evaluation import linear
from aecompress.evaluation.common import (
    POOLING_MODES,
    length_batches,
    pad,
    pad_batch,
    pad_token_id,
    pool,
)
from aecompress.evaluation.kinds import require
from aecompress.evaluation.metrics import METRICS, scores
from aecompress.models import check_positions, model_device
from aecompress.progress import progress_bar

Batch = dict[str, torch.Tensor]


@dataclass
class Examples:
    features: list[dict[str, list[int]]]  # input_ids (and token_type_ids if the model uses them)
    labels: np.ndarray  # class indices, or float scores for regression


def read_examples(
    spec: GlueTask,
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    columns: tuple[int, ...] | None = None,
) -> Examples:
    """Tokenised examples of a GLUE tsv file (truncated to max_length, not padded): the
    task's text columns (a pair in the tokenizer's pair encoding), or `columns`."""
    lines = data_file(path).read_text(encoding="utf-8-sig").splitlines()
    rows = [line.split("\t") for line in lines[1 if spec.header else 0 :] if line]
    texts = [[row[c] for row in rows] for c in columns or spec.text_columns]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    names = [n for n in ("input_ids", "token_type_ids") if n in encoded]
    features = [{n: encoded[n][i] for n in names} for i in range(len(rows))]
    raw = [row[spec.label_column] for row in rows]
    if spec.labels is None:
        return Examples(features, np.array([float(y) for y in raw], dtype=np.float32))
    return Examples(features, np.array([spec.labels.index(y) for y in raw]))


def collate(
    features: list[dict[str, list[int]]], pad_id: int, device: torch.device | None = None
) -> Batch:
    """The padded batch (on `device`, default the CPU)."""
    input_ids, mask = pad_batch([f["input_ids"] for f in features], pad_id, device)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = pad([f["token_type_ids"] for f in features], 0).to(device)
    return batch


def check_pooling(pooling: str) -> None:
    if pooling not in ("auto", *POOLING_MODES):
        raise AecompressError(f"unknown pooling '{pooling}': auto, {', '.join(POOLING_MODES)}")


def pooled_output(out: Any, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """An encoder output's [batch, hidden] sentence vector: with "auto" the model's own
    pooler (BERT's tanh layer on [CLS]) when it has one, else [CLS]; else `pool`'s mode."""
    if pooling != "auto":
        return pool(out.last_hidden_state, mask, pooling)
    pooler = getattr(out, "pooler_output", None)
    return pooler if pooler is not None else out.last_hidden_state[:, 0]


class SequenceClassifier(nn.Module):
    """An encoder (with its config) and a dropout + Linear head on its pooled output."""

    def __init__(
        self, encoder: nn.Module, config: PretrainedConfig, outputs: int, pooling: str = "auto"
    ) -> None:
        super().__init__()
        check_pooling(pooling)
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(
            getattr(config, "classifier_dropout", None) or config.hidden_dropout_prob
        )
        self.head = nn.Linear(config.hidden_size, outputs)
        nn.init.normal_(self.head.weight, std=config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = pooled_output(self.encoder(**batch), batch["attention_mask"], self.pooling)
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
    device = model_device(classifier)
    bar = progress_bar(total=total_steps, desc="fine-tune", enabled=progress)
    for _ in range(epochs):
        order = torch.randperm(len(train.features), generator=generator).tolist()
        for number, start in enumerate(range(0, len(order), batch_size), start=1):
            chosen = order[start : start + batch_size]
            logits = classifier(collate([train.features[i] for i in chosen], pad_id, device))
            loss = _loss(logits, torch.as_tensor(train.labels[chosen], device=device))
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
        inputs = collate([examples.features[i] for i in batch], pad_id, model_device(classifier))
        logits = classifier(inputs)
        predicted = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
        out[batch] = predicted.cpu().numpy()
    return out


def _take(examples: Examples, keep: torch.Tensor) -> Examples:
    return Examples([examples.features[i] for i in keep], examples.labels[keep.numpy()])


def _subset(examples: Examples, size: int) -> Examples:
    """A random `size` of the examples, drawn from torch's global RNG."""
    return _take(examples, torch.randperm(len(examples.labels))[:size])


def held_out(examples: Examples, share: float, seed: int) -> tuple[Examples, Examples]:
    """The examples split in two by a seeded permutation: the rest, and a `share` of them
    (at least one example in each part)."""
    if not 0 < share < 1 or len(examples.labels) < 2:
        raise AecompressError(f"cannot hold out a share {share} of {len(examples.labels)} examples")
    order = torch.randperm(len(examples.labels), generator=torch.Generator().manual_seed(seed))
    count = min(max(1, round(share * len(order))), len(order) - 1)
    return _take(examples, order[count:]), _take(examples, order[:count])


def _checked_spec(name: str, task: str, model: PreTrainedModel, max_length: int) -> GlueTask:
    """The spec of GLUE `task`, once `model` is known to run task `name` at max_length."""
    require("encoder", model, name)
    check_positions(model, max_length, "max_length")
    return GLUE_TASKS[task]


def _read_splits(
    spec: GlueTask,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    columns: tuple[int, ...] | None = None,
) -> tuple[Examples, Examples]:
    """The train and dev examples (of `columns`, default the task's text columns)."""
    train_path, dev_path = spec.files
    return (
        read_examples(spec, train_path, tokenizer, max_length, columns),
        read_examples(spec, dev_path, tokenizer, max_length, columns),
    )


def _score(spec: GlueTask, predicted: np.ndarray, dev: Examples) -> dict[str, float]:
    return scores(spec.metrics, predicted, dev.labels)


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
    split: str = "dev",
    heldout: float = 0.1,
    heldout_seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Fine-tune a copy of the model on the train split (or a seeded random
    `train_fraction` of it) and report the dev metrics; with split "heldout", train on the
    train split less a seeded `heldout` share of it and report that share's metrics."""
    if not 0 < train_fraction <= 1:
        raise AecompressError("train_fraction must be in (0, 1]")
    spec = _checked_spec(f"glue-{task}", task, model, max_length)
    if split not in ("dev", "heldout"):
        raise AecompressError(f"glue-{task} has no split '{split}': dev, heldout")
    train_path, dev_path = spec.files
    train = read_examples(spec, train_path, tokenizer, max_length)
    if split == "heldout":  # the dev file is not read
        train, dev = held_out(train, heldout, heldout_seed)
    else:
        dev = read_examples(spec, dev_path, tokenizer, max_length)
    pad_id = pad_token_id(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        train = _subset(train, max(1, round(train_fraction * len(train.labels))))
        outputs = 1 if spec.labels is None else len(spec.labels)
        classifier = SequenceClassifier(
            copy.deepcopy(model.base_model), model.config, outputs, pooling
        ).to(model_device(model))
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
    return _score(spec, predicted, dev)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (dropout off) under torch.no_grad; its modes restored after."""
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for sub, training in modes.items():
            sub.training = training


def features(
    encoder: nn.Module,
    examples: Examples,
    *,
    pad_id: int,
    pooling: str,
    batch_size: int,
    progress: bool = False,
) -> torch.Tensor:
    """Pooled sentence (pair) vectors [examples, hidden] of the frozen encoder, float64."""
    lengths = [len(f["input_ids"]) for f in examples.features]
    out: torch.Tensor | None = None
    with _frozen(encoder):
        for batch in progress_bar(
            length_batches(lengths, batch_size), desc="features", enabled=progress
        ):
            inputs = collate([examples.features[i] for i in batch], pad_id, model_device(encoder))
            pooled = pooled_output(encoder(**inputs), inputs["attention_mask"], pooling)
            if out is None:
                out = torch.empty(len(lengths), pooled.shape[-1], dtype=torch.float64)
            out[batch] = pooled.double().cpu()
    if out is None:
        raise AecompressError("no examples to encode")
    return out


def _predictions(outputs: torch.Tensor) -> torch.Tensor:
    """Class indices of [n, classes] logits; scores of [n] outputs as they are."""
    return outputs.argmax(-1) if outputs.dim() == 2 else outputs


def fit_head(
    spec: GlueTask, x: torch.Tensor, labels: np.ndarray, l2: float | None, folds: int
) -> linear.LinearHead:
    """A logistic (classes) or ridge (STS-B scores) head on the train features; when l2 is
    None, the l2 whose `folds`-fold cross-validation on them scores the task's first metric
    highest (folds drawn from torch's global RNG)."""
    metric = METRICS[spec.metrics[0]]
    if spec.labels is None:
        y = torch.as_tensor(labels, dtype=torch.float64)
        fit: linear.Fit = linear.fit_ridge
    else:
        y = torch.as_tensor(labels, dtype=torch.long)
        fit = partial(linear.fit_logistic, classes=len(spec.labels))
    if l2 is None:

        def score(outputs: torch.Tensor, gold: torch.Tensor) -> float:
            return metric(_predictions(outputs).numpy(), gold.numpy())

        l2 = linear.choose_l2(x, y, fit, score, folds=folds)
    return fit(x, y, l2, None)


PAIRS = ("joint", "separate")  # how the probe encodes a sentence pair


def _check_probe_options(
    max_train: int | None, pooling: str, pairs: str, l2: float | None, folds: int
) -> None:
    check_pooling(pooling)
    if pairs not in PAIRS:
        raise AecompressError(f"unknown pairs '{pairs}': {', '.join(PAIRS)}")
    if max_train is not None and max_train < 2:
        raise AecompressError(f"max_train must be at least 2 (got {max_train})")
    if l2 is not None and not l2 > 0:
        raise AecompressError(f"l2 must be positive (got {l2})")
    if folds < 2:
        raise AecompressError(f"folds must be at least 2 (got {folds})")


def _probe_examples(
    spec: GlueTask, tokenizer: PreTrainedTokenizerBase, max_length: int, pairs: str
) -> tuple[list[Examples], list[Examples]]:
    """Train and dev examples as the probe encodes them: one Examples each (a sentence, or
    a pair in the pair encoding), or with pairs "separate" one per sentence of the pair."""
    groups = [(c,) for c in spec.text_columns] if pairs == "separate" else [spec.text_columns]
    splits = [_read_splits(spec, tokenizer, max_length, columns) for columns in groups]
    return [train for train, _ in splits], [dev for _, dev in splits]


def sentence_features(
    encode: Callable[[Examples], torch.Tensor], parts: list[Examples]
) -> torch.Tensor:
    """`encode` of the examples; of a pair encoded sentence by sentence (u, v), SentEval's
    [u, v, |u - v|, u * v]."""
    vectors = [encode(part) for part in parts]
    if len(vectors) == 1:
        return vectors[0]
    u, v = vectors
    return torch.cat([u, v, (u - v).abs(), u * v], dim=1)


def probe(
    task: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_train: int | None = 4000,
    pooling: str = "mean",
    pairs: str = "separate",
    l2: float | None = None,
    folds: int = 5,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """A frozen-feature probe: the dev metrics of a linear head fitted on the frozen
    encoder's pooled features of the train split (not the paper's fine-tuning protocol).

    Sentences are encoded by the model's encoder in eval mode without gradients; each
    sentence of a pair alone (`pairs` "separate", the default: SentEval's features
    [u, v, |u - v|, u * v]; on all-MiniLM-L6-v2's dense dev sets STS-B Pearson 85 against
    45 and RTE 56 against 51, where "joint" leaves MRPC and RTE near their majority class)
    or the pair in the tokenizer's pair encoding, as fine-tuning reads it ("joint"). `pooling`
    "mean" (the default: what such sentence encoders are trained to produce, and better
    than "auto" on MiniLM's CoLA, RTE and MRPC) or "auto" / "cls" / "max" as for
    fine-tuning. Features are standardised with train statistics. The head minimises
    mean cross-entropy (logistic regression; ridge: squared error for STS-B) +
    l2 * ||W||^2 (`linear`); l2 is given, or when None the one of 1e-5 ... 10 whose
    out-of-fold predictions over `folds` random folds of the train examples score the
    task's first metric highest (the dev split is only scored). `max_train` caps the
    train examples at a random subset of that size (None: all; SST-2 has 67k). The subset
    and the folds follow `seed`.
    """
    _check_probe_options(max_train, pooling, pairs, l2, folds)
    spec = _checked_spec(f"glue-{task}-probe", task, model, max_length)
    train, dev = _probe_examples(spec, tokenizer, max_length, pairs)
    encode = partial(
        features,
        model.base_model,
        pad_id=pad_token_id(tokenizer),
        pooling=pooling,
        batch_size=batch_size,
        progress=progress,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if max_train is not None and max_train < len(train[0].labels):
            keep = torch.randperm(len(train[0].labels))[:max_train]
            train = [_take(part, keep) for part in train]
        x_train, x_dev = linear.standardise(
            sentence_features(encode, train), sentence_features(encode, dev)
        )
        head = fit_head(spec, x_train, train[0].labels, l2, folds)
    return _score(spec, _predictions(head(x_dev)).numpy(), dev[0])
