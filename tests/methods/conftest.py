"""Fixtures of the method tests: a tiny Llama model, a real tokenizer, an isolated cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import transformers

from aecompress.models import LoadedModel, resolve_embedded
from tests.methods.helpers import tiny_llama


@pytest.fixture(scope="session")
def minilm_tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(resolve_embedded("minilm-l6")))


@pytest.fixture
def tiny(minilm_tokenizer: transformers.PreTrainedTokenizerBase) -> LoadedModel:
    return LoadedModel(tiny_llama(), minilm_tokenizer, "tiny-llama", "AutoModelForCausalLM")


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
