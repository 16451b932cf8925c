import math

import pytest
import torch
import transformers

from aecompress.data import wikitext2_text
from aecompress.errors import AecompressError
from aecompress.evaluation import perplexity as perplexity_module
from aecompress.evaluation.perplexity import perplexity, window_ids, windows_perplexity
from tests.conftest import tiny_model


class Uniform(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform: perplexity = vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = transformers.PretrainedConfig(vocab_size=vocab)

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


def test_windows_longer_than_the_model_positions_are_refused(tokenizer):
    with pytest.raises(AecompressError, match="seq_len=513 is longer than the 512 positions"):
        perplexity(tiny_model("gpt2"), tokenizer, windows=1, seq_len=513, progress=False)


def test_a_batch_that_cannot_fit_in_memory_is_refused(tokenizer, monkeypatch):
    monkeypatch.setattr(perplexity_module, "available_memory", lambda: 2**30)
    model = tiny_model("llama")  # 4 windows x 512 tokens x 30522 logits: about 0.7 GiB
    perplexity(model, tokenizer, windows=4, seq_len=512, progress=False)
    model.config.vocab_size = 200_000  # a large vocabulary: about 4.6 GiB
    with pytest.raises(AecompressError, match=r"4 x 512 tokens needs about 4\.6 GiB, more than"):
        perplexity(model, tokenizer, windows=4, seq_len=512, progress=False)
