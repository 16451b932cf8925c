import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aecompress.errors import AecompressError
from aecompress.evaluation import glue as glue_module
from aecompress.evaluation.glue import (
    GLUE_TASKS,
    PAIRS,
    SequenceClassifier,
    features,
    finetune,
    glue,
    probe,
    read_examples,
    sentence_features,
)
from aecompress.evaluation.metrics import STDERR

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


def assert_glue_metrics(task: str, result: dict[str, float]) -> None:
    """The task's metrics, finite, and beside accuracy its standard error."""
    metrics = GLUE_TASKS[task].metrics
    assert tuple(name for name in result if not name.endswith(STDERR)) == metrics
    assert set(result) - set(metrics) == {m + STDERR for m in metrics if m == "accuracy"}
    assert all(math.isfinite(value) for value in result.values())


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_glue_end_to_end_on_a_tiny_model(task, tokenizer, tiny_bert) -> None:
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    fraction = 40 / COUNTS[task][0]
    result = glue(
        task, tiny_bert, tokenizer, epochs=1, batch_size=8, train_fraction=fraction, progress=False
    )
    assert_glue_metrics(task, result)
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


def test_the_heldout_split_is_carved_from_train_and_never_reads_dev(
    monkeypatch, tokenizer, tiny_bert
) -> None:
    read, scored = [], []
    reader, scorer = glue_module.read_examples, glue_module._score
    monkeypatch.setattr(
        glue_module,
        "read_examples",
        lambda spec, path, *a: read.append(path) or reader(spec, path, *a),
    )
    monkeypatch.setattr(
        glue_module, "_score", lambda spec, p, dev: scored.append(dev) or scorer(spec, p, dev)
    )
    options = {"epochs": 1, "batch_size": 8, "train_fraction": 0.05, "progress": False}
    result = glue("rte", tiny_bert, tokenizer, split="heldout", heldout=0.02, **options)
    assert_glue_metrics("rte", result)
    assert read == [GLUE_TASKS["rte"].files[0]]
    assert len(scored[0].labels) == round(0.02 * COUNTS["rte"][0])


def test_held_out_is_a_seeded_partition() -> None:
    from aecompress.evaluation.glue import Examples, held_out

    examples = Examples([{"input_ids": [i]} for i in range(50)], np.arange(50))
    rest, share = held_out(examples, 0.1, seed=3)
    assert len(share.labels) == 5 and len(rest.labels) == 45
    assert sorted([*rest.labels, *share.labels]) == list(range(50))
    assert list(held_out(examples, 0.1, seed=3)[1].labels) == list(share.labels)
    assert list(held_out(examples, 0.1, seed=4)[1].labels) != list(share.labels)


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


# --- the frozen-feature probe -----------------------------------------------------------

FILLER = "the cat sat on a mat dog ran to big red blue house tree road car"


def synthetic_glue(folder: Path, train: int, dev: int, seed: int = 0) -> None:
    """SST-2 and STS-B files a probe can learn: SST-2's label is whether the sentence holds
    "good" (else "bad"); STS-B's score is how many of the first sentence's 5 words are
    "good" (the second sentence is filler)."""
    rng = np.random.default_rng(seed)

    def words(count: int) -> list[str]:
        return [str(w) for w in rng.choice(FILLER.split(), count)]

    for split, rows in (("train", train), ("dev", dev)):
        sst2, stsb = ["sentence\tlabel"], ["\t".join(f"c{i}" for i in range(10))]
        for _ in range(rows):
            label = int(rng.integers(2))
            sentence = words(5)
            sentence.insert(int(rng.integers(6)), "good" if label else "bad")
            sst2.append(f"{' '.join(sentence)}\t{label}")
            score = int(rng.integers(6))
            first = ["good"] * score + words(5 - score)
            stsb.append("\t".join(["x"] * 7 + [" ".join(first), " ".join(words(5)), str(score)]))
        for task, lines in (("SST-2", sst2), ("STS-B", stsb)):
            (folder / "glue" / task).mkdir(parents=True, exist_ok=True)
            (folder / "glue" / task / f"{split}.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def learnable(tmp_path, monkeypatch) -> Path:
    synthetic_glue(tmp_path, train=300, dev=200)
    monkeypatch.setenv("AECOMPRESS_DATA", str(tmp_path))
    return tmp_path


def test_probe_learns_a_learnable_task(learnable, tokenizer, tiny_bert) -> None:
    assert probe("sst2", tiny_bert, tokenizer, progress=False)["accuracy"] >= 95
    result = probe("stsb", tiny_bert, tokenizer, progress=False)
    assert result["pearson"] >= 90 and result["spearman"] >= 90


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_probe_on_every_task_leaves_the_model_as_it_was(task, tokenizer, tiny_bert) -> None:
    model = copy.deepcopy(tiny_bert).train()  # dropout on: the probe must switch it off
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = probe(task, model, tokenizer, max_train=40, progress=False)
    assert_glue_metrics(task, result)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(module.training for module in model.modules())


def test_probe_is_deterministic_and_follows_the_seed(learnable, tokenizer, tiny_bert) -> None:
    def run(seed: int) -> dict[str, float]:
        return probe("sst2", tiny_bert, tokenizer, max_train=30, seed=seed, progress=False)

    assert run(1) == run(1)
    assert len({run(seed)["accuracy"] for seed in range(4)}) > 1  # other subsets and folds


def test_dropout_is_off_while_encoding(tokenizer, tiny_bert) -> None:
    spec = GLUE_TASKS["rte"]
    dev = read_examples(spec, spec.files[1], tokenizer, max_length=32)
    encoder = copy.deepcopy(tiny_bert).train()
    runs = [features(encoder, dev, pad_id=0, pooling="mean", batch_size=16) for _ in "ab"]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (len(dev.labels), 32)


@pytest.mark.parametrize("max_train,encoded", [(25, 25), (None, 300), (1000, 300)])
def test_max_train_caps_the_train_examples(
    learnable, monkeypatch, tokenizer, tiny_bert, max_train, encoded
) -> None:
    sizes: list[int] = []
    real_features = glue_module.features

    def counting(encoder, examples, **kwargs):
        sizes.append(len(examples.labels))
        return real_features(encoder, examples, **kwargs)

    chosen: list[int] = []
    real_choose = glue_module.linear.choose_l2

    def spying(x, *args, **kwargs):
        chosen.append(len(x))
        return real_choose(x, *args, **kwargs)

    monkeypatch.setattr(glue_module, "features", counting)
    monkeypatch.setattr(glue_module.linear, "choose_l2", spying)
    probe("sst2", tiny_bert, tokenizer, max_train=max_train, progress=False)
    assert sizes == [encoded, 200]  # the capped train split, then all of dev
    assert chosen == [encoded]  # l2 is chosen on the train features only


def test_pairs_are_encoded_one_sentence_at_a_time_by_default(
    monkeypatch, tokenizer, tiny_bert
) -> None:
    encoded: list[tuple[int, int]] = []
    real_features = glue_module.features

    def spying(encoder, examples, **kwargs):
        segments = {t for f in examples.features for t in f.get("token_type_ids", [0])}
        encoded.append((len(examples.labels), max(segments)))
        return real_features(encoder, examples, **kwargs)

    monkeypatch.setattr(glue_module, "features", spying)
    probe("mrpc", tiny_bert, tokenizer, max_train=20, progress=False)
    assert encoded == [(20, 0), (20, 0), (408, 0), (408, 0)]  # one sentence at a time
    encoded.clear()
    probe("mrpc", tiny_bert, tokenizer, max_train=20, pairs="joint", progress=False)
    assert encoded == [(20, 1), (408, 1)]  # joint: the pair encoding, segments 0 and 1


def test_separate_pairs_learn_and_single_sentences_ignore_it(
    learnable, tokenizer, tiny_bert
) -> None:
    result = probe("stsb", tiny_bert, tokenizer, pairs="separate", progress=False)
    assert result["pearson"] >= 90
    single = [probe("sst2", tiny_bert, tokenizer, pairs=p, progress=False) for p in PAIRS]
    assert single[0] == single[1]


def test_sentence_features_of_a_pair_are_senteval_s() -> None:
    u, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 4.0]])
    vectors = iter([u, v])
    combined = sentence_features(lambda part: next(vectors), [None, None])
    assert combined.tolist() == [[1.0, -2.0, 3.0, 4.0, 2.0, 6.0, 3.0, -8.0]]
    assert torch.equal(sentence_features(lambda part: u, [None]), u)


def test_a_fixed_l2_skips_cross_validation(learnable, monkeypatch, tokenizer, tiny_bert) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("cross-validation with a fixed l2")

    monkeypatch.setattr(glue_module.linear, "choose_l2", refuse)
    assert probe("sst2", tiny_bert, tokenizer, l2=1e-3, progress=False)["accuracy"] >= 95


@pytest.mark.parametrize(
    "options,message",
    [
        ({"max_train": 1}, "max_train must be at least 2"),
        ({"l2": 0.0}, "l2 must be positive"),
        ({"folds": 1}, "folds must be at least 2"),
        ({"pooling": "median"}, "unknown pooling 'median'"),
        ({"pairs": "crossed"}, "unknown pairs 'crossed': joint, separate"),
        ({"max_length": 600}, "max_length=600 is longer than the 512 positions"),
    ],
)
def test_probe_bad_options(tokenizer, tiny_bert, options, message) -> None:
    with pytest.raises(AecompressError, match=message):
        probe("rte", tiny_bert, tokenizer, **options)


def test_probe_needs_an_encoder(tokenizer, tiny_llama) -> None:
    with pytest.raises(AecompressError, match="'glue-rte-probe' needs a bidirectional"):
        probe("rte", tiny_llama, tokenizer)
