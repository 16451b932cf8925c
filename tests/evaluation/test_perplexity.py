import math

import pytest
import torch

from aecompress.data import wikitext2_text
from aecompress.errors import AecompressError
from aecompress.evaluation.perplexity import perplexity, window_ids, windows_perplexity
from tests.conftest import tiny_model


class Uniform(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform: perplexity = vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        return type("Out", (), {"logits": logits})


def test_uniform_model_has_perplexity_equal_to_vocabulary(tokenizer):
    ids = window_ids(_ModTokenizer(tokenizer, 50), wikitext2_text("test"), 32, 3)
    assert ids.shape == (3, 32)
    assert windows_perplexity(Uniform(50), ids) == pytest.approx(50, rel=1e-6)


class _ModTokenizer:
    def __init__(self, inner, vocab):
        self.inner, self.vocab = inner, vocab

    def __call__(self, text):
        return {"input_ids": [i % self.vocab for i in self.inner(text)["input_ids"]]}


def test_perplexity_matches_a_hand_computed_mean_nll(tokenizer):
    model = tiny_model("llama")
    ids = window_ids(tokenizer, wikitext2_text("test"), 16, 2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])
    expected = math.exp(-logprobs.mean().item())
    result = perplexity(model, tokenizer, windows=2, seq_len=16, batch_size=1, progress=False)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_wikitext2_rows_are_joined_the_gptq_way():
    text = wikitext2_text("test")
    # rows "", " = Robert Boulter = \n", "", " Robert ..." joined by "\n\n"
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert text.count("\n\n") >= 4357


def test_encoder_without_lm_head_is_refused(tokenizer):
    with pytest.raises(AecompressError, match="no causal LM head"):
        perplexity(tiny_model("bert").bert, tokenizer, windows=1, seq_len=16)
