import pytest

from aecompress.errors import AecompressError
from aecompress.models import EMBEDDED, load_model, resolve_embedded


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(
        EMBEDDED, "ghost", EMBEDDED["minilm-l6"].__class__("no_such_pkg", "m", "pip install ghost")
    )
    with pytest.raises(AecompressError, match="pip install ghost"):
        resolve_embedded("ghost")


def test_missing_gguf_file():
    with pytest.raises(AecompressError, match="no such GGUF file"):
        load_model("/nowhere/model.gguf")


@pytest.mark.real
def test_embedded_models_load_with_their_heads(smollm2, minilm):
    assert smollm2.auto_class == "AutoModelForCausalLM"
    assert smollm2.model.config.num_hidden_layers == 30
    assert smollm2.model.config.num_key_value_heads == 3
    assert next(smollm2.model.parameters()).dtype.is_floating_point
    assert minilm.auto_class == "AutoModel" and minilm.model.config.hidden_size == 384
