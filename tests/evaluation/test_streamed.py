"""Streamed evaluation gives the in-memory numbers: every batch through one block at a time,
then the model's own head on the replayed final hidden states."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aecompress.evaluation.multiple_choice import multiple_choice
from aecompress.evaluation.perplexity import perplexity
from aecompress.evaluation.streamed import StreamedForward, chunks, replaying
from aecompress.targets import transformer_blocks
from tests.conftest import tiny_model


class ModelBlocks:
    """A BlockSource of a model already in memory: loading and releasing only record the
    calls, and check that a block runs only between its load and its release."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks_path, self.blocks = transformer_blocks(model)
        self.calls: list[tuple[str, int]] = []
        self.loaded: int | None = None
        for index, block in enumerate(self.blocks):  # its parts compute only when it runs
            for part in block.children():
                part.register_forward_pre_hook(self._check_loaded(index))

    def _check_loaded(self, index: int):
        def hook(_module: nn.Module, _args: object) -> None:
            assert self.loaded == index, f"block {index} runs while block {self.loaded} is loaded"

        return hook

    def load(self, index: int, device: torch.device) -> None:
        assert self.loaded is None
        self.calls.append(("load", index))
        self.loaded = index

    def release(self, index: int) -> None:
        self.calls.append(("release", index))
        self.loaded = None


def _streamed(model: nn.Module, **kwargs) -> tuple[StreamedForward, ModelBlocks]:
    source = ModelBlocks(model)
    return StreamedForward(source, torch.device("cpu"), **kwargs), source  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_perplexity_equals_the_in_memory_one(arch, tokenizer):
    model = tiny_model(arch)
    settings = {"windows": 3, "seq_len": 32, "batch_size": 2, "progress": False}
    expected = perplexity(model, tokenizer, **settings).perplexity
    forward, source = _streamed(model)
    streamed = perplexity(model, tokenizer, forward=forward, **settings).perplexity
    assert streamed == pytest.approx(expected, rel=1e-6)
    # one pass over the blocks for both batches: each loaded once, released before the next
    layers = len(source.blocks)
    assert source.calls == [(c, i) for i in range(layers) for c in ("load", "release")]


def test_streamed_multiple_choice_equals_the_in_memory_one(tokenizer):
    model = tiny_model("llama")
    settings = {"limit": 6, "batch_size": 4, "progress": False}
    expected = multiple_choice("arc-easy", model, tokenizer, **settings)
    forward, _ = _streamed(model)
    streamed = multiple_choice("arc-easy", model, tokenizer, forward=forward, **settings)
    assert streamed == pytest.approx(expected, rel=1e-6)


def test_chunks_that_fit_a_small_budget_give_the_same_numbers(tokenizer):
    model = tiny_model("llama")
    settings = {"windows": 3, "seq_len": 16, "batch_size": 1, "progress": False}
    expected = perplexity(model, tokenizer, **settings).perplexity
    forward, source = _streamed(model, budget=1)  # every batch its own chunk
    assert perplexity(model, tokenizer, forward=forward, **settings).perplexity == pytest.approx(
        expected, rel=1e-6
    )
    assert source.calls.count(("load", 0)) == 3  # the blocks pass once per chunk


def test_chunks_keep_the_order_and_the_budget():
    batches = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)} for _ in range(5)]
    one = 4 * 4 * 8  # four tokens of hidden size 8 in float32
    found = list(chunks(batches, 2 * one, hidden_size=8))
    assert [len(c) for c in found] == [2, 2, 1]
    assert [b for c in found for b in c] == batches


def test_replay_leaves_the_blocks_as_they_were():
    model = tiny_model("llama")
    _, blocks = transformer_blocks(model)
    ids = torch.tensor([[5, 6, 7]])
    before = model(input_ids=ids).logits
    final = torch.zeros(1, 3, model.config.hidden_size)
    with replaying(blocks, final, as_tuple=False):
        replayed = model(input_ids=ids).logits
    norm_of_zero = model.model.norm(final)  # the head sees exactly the replayed states
    assert torch.allclose(replayed, model.lm_head(norm_of_zero))
    assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.real
def test_streamed_smollm2_perplexity_equals_the_in_memory_one(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    settings = {"windows": 2, "seq_len": 128, "batch_size": 1, "progress": False}
    expected = perplexity(model, tokenizer, **settings).perplexity
    forward, _ = _streamed(model)
    streamed = perplexity(model, tokenizer, forward=forward, **settings).perplexity
    assert streamed == pytest.approx(expected, rel=1e-6)
