"""Shared fixtures: tiny random models (hidden 32, 2 layers) on the MiniLM tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models run many small ops: one thread is faster than two, and immune to the
# barrier stalls that oversubscribed OpenMP threads suffer on a shared CI machine
# (measured: a tiny GLUE run 1.0 s with one thread, 8.7 s with two, under load).
torch.set_num_threads(1)

VOCAB = 30522  # the all-MiniLM-L6-v2 (bert-base-uncased) vocabulary


def _tiny(model_class: type, config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return model_class(config).eval()


def _bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="session")
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    from aecompress.models import resolve_embedded

    return transformers.AutoTokenizer.from_pretrained(resolve_embedded("minilm-l6"))


@pytest.fixture(scope="session")
def tiny_bert() -> transformers.BertModel:
    return _tiny(transformers.BertModel, _bert_config())


@pytest.fixture(scope="session")
def tiny_bert_mlm() -> transformers.BertForMaskedLM:
    return _tiny(transformers.BertForMaskedLM, _bert_config())


@pytest.fixture(scope="session")
def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return _tiny(transformers.LlamaForCausalLM, config)


@pytest.fixture(scope="session")
def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=512
    )
    return _tiny(transformers.GPT2LMHeadModel, config)
