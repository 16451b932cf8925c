"""Fixtures of the method tests: a tiny Llama model with the MiniLM tokenizer."""

from __future__ import annotations

import pytest
import transformers

from aecompress.models import LoadedModel
from tests.methods.helpers import tiny_llama


@pytest.fixture
def tiny(tokenizer: transformers.PreTrainedTokenizerBase) -> LoadedModel:
    return LoadedModel(tiny_llama(), tokenizer, "tiny-llama", "AutoModelForCausalLM")
