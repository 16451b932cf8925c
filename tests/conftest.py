"""Shared fixtures: tiny random models of every architecture, a real tokenizer, real models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers

from aecompress.models import LoadedModel, load_model, resolve_embedded

VOCAB = 30522  # the minilm-l6 (BERT uncased) tokenizer serves every tiny model

TINY_CONFIGS = {
    "bert": lambda: transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=101, eos_token_id=102
        )
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    ),
}

# The families each tiny architecture has (GPT-2 and BERT have no gate).
FAMILIES = {
    "bert": ["embed", "q", "k", "v", "o", "up", "down"],
    "gpt2": ["embed", "q", "k", "v", "o", "up", "down"],
    "llama": ["embed", "q", "k", "v", "o", "up", "gate", "down"],
}


def tiny_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return TINY_CONFIGS[arch]().eval()


@pytest.fixture(scope="session")
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(resolve_embedded("minilm-l6")))


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm() -> LoadedModel:
    return load_model("minilm-l6")


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# --- small tiny models for method tests (few rows: fast fits) -------------------------

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
def small_ids() -> torch.Tensor:
    return torch.randint(0, SMALL_VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


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
