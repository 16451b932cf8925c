"""Shared fixtures: tiny random models of every architecture, a real tokenizer, real models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers

import aecompress
from aecompress.compressed import CompressedModel
from aecompress.models import LoadedModel, load_model, resolve_embedded

VOCAB = 30522  # the minilm-l6 (BERT uncased) tokenizer serves every tiny model

ARCHITECTURES = ("bert", "gpt2", "llama")  # every contract test runs on each

# The families each tiny architecture has (GPT-2 and BERT have no gate).
FAMILIES = {
    "bert": ["embed", "q", "k", "v", "o", "up", "down"],
    "gpt2": ["embed", "q", "k", "v", "o", "up", "down"],
    "llama": ["embed", "q", "k", "v", "o", "up", "gate", "down"],
}


def tiny_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random model on the full MiniLM vocabulary (see make_tiny)."""
    return make_tiny(arch, VOCAB, seed)


@pytest.fixture(scope="session")
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(resolve_embedded("minilm-l6")))


@pytest.fixture(params=ARCHITECTURES)
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
        max_position_embeddings=512,
    )
    if arch == "bert":
        model: transformers.PreTrainedModel = transformers.BertForMaskedLM(bert)
    elif arch == "bert-encoder":
        model = transformers.BertModel(bert)
    elif arch == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=vocab,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=512,
                bos_token_id=1,
                eos_token_id=2,
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


@pytest.fixture(scope="session")
def tiny_bert() -> transformers.PreTrainedModel:
    return tiny_model("bert-encoder")


@pytest.fixture(scope="session")
def tiny_bert_mlm() -> transformers.PreTrainedModel:
    return tiny_model("bert")


@pytest.fixture(scope="session")
def tiny_llama() -> transformers.PreTrainedModel:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_gpt2() -> transformers.PreTrainedModel:
    return tiny_model("gpt2")


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of SMALL_VOCAB entries (specials, frequent English words,
    fillers): every tiny model's vocabulary, tokenising WikiText in a blink."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    common = "the , . of and in to a was is on as for with by that he at from it his an"
    words = specials + common.split()
    words += [f"w{i}" for i in range(SMALL_VOCAB - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def compressed_tiny(tokenizer, arch: str = "bert", **recipe) -> CompressedModel:
    """A tiny model of `arch` compressed with its tokenizer, by default svd on k at
    ratio 2 (`recipe` replaces any of these or adds fields)."""
    chosen = {"method": "svd", "ratio": 2, "targets": ["k"], **recipe}
    return aecompress.compress(tiny_model(arch), tokenizer=tokenizer, progress=False, **chosen)
