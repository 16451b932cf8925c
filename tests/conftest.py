"""Shared fixtures: tiny randomly initialised models built from configs (fast, offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable

import pytest
import torch
import transformers

SMALL_VOCAB = 96


def make_tiny(arch: str, vocab: int = SMALL_VOCAB, seed: int = 0) -> transformers.PreTrainedModel:
    """A 2-layer, hidden-32 random model: `bert` (masked LM), `bert-encoder` (no head),
    `gpt2`, or `llama` (grouped-query attention: K/V narrower than Q; tied embeddings)."""
    torch.manual_seed(seed)
    bert = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    if arch == "bert":
        model: transformers.PreTrainedModel = transformers.BertForMaskedLM(bert)
    elif arch == "bert-encoder":
        model = transformers.BertModel(bert)
    elif arch == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64
            )
        )
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
                tie_word_embeddings=True,
            )
        )
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture
def tiny() -> Callable[..., transformers.PreTrainedModel]:
    """Factory: tiny(arch, vocab=..., seed=...) -> a fresh tiny model."""
    return make_tiny


@pytest.fixture
def small_ids() -> torch.Tensor:
    return torch.randint(0, SMALL_VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
