import pytest
import torch
from torch import nn

from aecompress.evaluation import multiple_choice as mc
from aecompress.evaluation.multiple_choice import (
    Item,
    continuation_logprobs,
    encode_pairs,
    load_items,
)


def test_loaders_read_every_item() -> None:
    arc = load_items("arc-easy", "test")
    assert len(arc) == 2376
    assert all(0 <= item.label < len(item.choices) for item in arc)
    assert arc[0].context.startswith("Question: ") and arc[0].context.endswith("\nAnswer:")
    piqa = load_items("piqa", "validation")
    assert len(piqa) == 1838 and {item.label for item in piqa} == {0, 1}
    hellaswag = load_items("hellaswag", "validation")
    assert len(hellaswag) == 10042
    assert all(len(item.choices) == 4 for item in hellaswag)
    assert sum(item.label == 0 for item in hellaswag) == 2515


def test_encode_pairs_splits_the_whole_text(tokenizer) -> None:
    [(context, continuation)] = encode_pairs(tokenizer, [("Question: why?\nAnswer:", " because")])
    whole = tokenizer("Question: why?\nAnswer: because", add_special_tokens=False)["input_ids"]
    assert context + continuation == whole
    assert continuation == tokenizer(" because", add_special_tokens=False)["input_ids"]


def _manual_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([(context + continuation)[:-1]])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logprobs[len(context) + i - 1, token].item() for i, token in enumerate(continuation))


class WithoutLogitsToKeep(nn.Module):
    """A causal LM whose forward does not take logits_to_keep (all logits are computed)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("trim", [True, False])
def test_batched_scores_equal_a_manual_log_prob_sum(request, name: str, trim: bool) -> None:
    model = request.getfixturevalue(name)
    pairs = [([5, 6, 7, 8], [9, 10]), ([11], [12, 13, 14]), ([15, 16], [17]), ([3] * 9, [4])]
    scorer = model if trim else WithoutLogitsToKeep(model)
    scores = continuation_logprobs(scorer, pairs, pad_id=0, batch_size=2, progress=False)
    expected = [_manual_logprob(model, c, x) for c, x in pairs]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_too_long_sequences_keep_their_last_tokens(tiny_gpt2) -> None:
    context = list(range(1000, 1600))  # longer than n_positions = 512
    [score] = continuation_logprobs(tiny_gpt2, [(context, [7, 8])], pad_id=0, progress=False)
    kept = [*context, 7, 8][-513:]
    assert score == pytest.approx(_manual_logprob(tiny_gpt2, kept[:-2], [7, 8]), abs=1e-4)


def test_accuracy_and_character_normalised_accuracy(monkeypatch, tiny_llama, tokenizer) -> None:
    items = [
        Item("q1", ["a", "bbbbbbbbb"], 1),  # sums -1, -3: acc picks 0; per char -1, -0.33
        # sums -1, -2.5: acc picks 0; per char of the choice, delimiter excluded (lm-eval):
        # -1, -0.83 picks 1 (with the delimiter's space counted it would be -0.5, -0.62: 0)
        Item("q2", ["a", "bbb"], 0),
    ]
    scores = [-1.0, -3.0, -1.0, -2.5]
    monkeypatch.setattr(mc, "load_items", lambda dataset, split: items)
    monkeypatch.setattr(mc, "continuation_logprobs", lambda *args, **kwargs: scores)
    result = mc.multiple_choice("piqa", tiny_llama, tokenizer, progress=False)
    # one of two right: standard error sqrt(0.5) / sqrt(2), as lm-eval's mean_stderr
    assert result == {"acc": 50.0, "acc_norm": 50.0, "acc_stderr": 50.0, "acc_norm_stderr": 50.0}


@pytest.mark.parametrize("dataset", ["arc-easy", "piqa", "hellaswag"])
def test_each_dataset_runs_end_to_end(dataset, tiny_llama, tokenizer) -> None:
    result = mc.multiple_choice(dataset, tiny_llama, tokenizer, limit=3, progress=False)
    assert set(result) == {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert result["acc"] in (0.0, 100 / 3, 200 / 3, 100.0)
    assert result["acc_norm"] in (0.0, 100 / 3, 200 / 3, 100.0)
