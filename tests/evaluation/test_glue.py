import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from aecompress.errors import AecompressError
from aecompress.evaluation.glue import (
    GLUE_TASKS,
    SequenceClassifier,
    finetune,
    glue,
    read_examples,
)

COUNTS = {  # (train rows, dev rows, dev positives or None), from data/glue/*/SOURCE.md
    "mrpc": (3668, 408, 279),
    "rte": (2490, 277, 131),  # label 1 = not_entailment
    "stsb": (5749, 1500, None),
    "sst2": (67349, 872, 444),
    "cola": (8551, 1043, 721),
}


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_read_examples(task, tokenizer) -> None:
    spec = GLUE_TASKS[task]
    train_rows, dev_rows, dev_positives = COUNTS[task]
    dev = read_examples(spec, spec.files[1], tokenizer, max_length=128)
    assert len(dev.features) == len(dev.labels) == dev_rows
    assert max(len(f["input_ids"]) for f in dev.features) <= 128
    if dev_positives is None:
        assert dev.labels.dtype == np.float32 and dev.labels.max() <= 5
    else:
        assert int(dev.labels.sum()) == dev_positives
    if len(spec.text_columns) == 2:  # sentence pairs carry segment ids
        assert max(dev.features[0]["token_type_ids"]) == 1
    if task != "sst2":  # 67k rows: the count is checked in SOURCE.md
        assert len(read_examples(spec, spec.files[0], tokenizer, 128).labels) == train_rows


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_glue_end_to_end_on_a_tiny_model(task, tokenizer, tiny_bert) -> None:
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    fraction = 40 / COUNTS[task][0]
    result = glue(
        task, tiny_bert, tokenizer, epochs=1, batch_size=8, train_fraction=fraction, progress=False
    )
    assert tuple(result) == GLUE_TASKS[task].metrics
    assert all(math.isfinite(value) for value in result.values())
    after = tiny_bert.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the given model is untouched


def test_glue_is_seeded(tokenizer, tiny_bert) -> None:
    def run() -> dict[str, float]:
        return glue(
            "rte",
            tiny_bert,
            tokenizer,
            epochs=1,
            batch_size=8,
            train_fraction=0.02,
            lr=1e-3,
            seed=7,
            progress=False,
        )

    assert run() == run()


class LowRankLinear(nn.Module):
    """A stand-in for a compressed module injected in place of an nn.Linear."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.randn(linear.out_features, rank) * 0.1)
        self.right = nn.Parameter(torch.randn(rank, linear.in_features) * 0.1)
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.left @ self.right).T + self.bias


def test_every_parameter_trains_including_injected_modules(tokenizer, tiny_bert) -> None:
    model = copy.deepcopy(tiny_bert)
    attention = model.encoder.layer[0].attention.self
    attention.key = LowRankLinear(attention.key, rank=4)
    attention.key.requires_grad_(False)  # frozen parameters are unfrozen for fine-tuning
    spec = GLUE_TASKS["mrpc"]
    train = read_examples(spec, spec.files[1], tokenizer, max_length=32)
    classifier = SequenceClassifier(model, model.config, outputs=2)
    start = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    finetune(
        classifier,
        train,
        pad_id=0,
        epochs=1,
        lr=1e-3,
        batch_size=16,
        grad_accum=2,
        warmup_ratio=0.1,
        seed=0,
        progress=False,
    )
    unchanged = [n for n, p in classifier.named_parameters() if torch.equal(p, start[n])]
    assert unchanged == []


def test_bad_options(tokenizer, tiny_bert, tiny_llama) -> None:
    with pytest.raises(AecompressError, match="train_fraction"):
        glue("rte", tiny_bert, tokenizer, train_fraction=0)
    with pytest.raises(AecompressError, match="max_length=600 is longer than the 512 positions"):
        glue("rte", tiny_bert, tokenizer, max_length=600)
    with pytest.raises(AecompressError, match="unknown pooling"):
        SequenceClassifier(tiny_bert, tiny_bert.config, 2, pooling="median")
    with pytest.raises(AecompressError, match="needs a bidirectional"):
        glue("rte", tiny_llama, tokenizer)
