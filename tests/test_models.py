import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aecompress.engine import compress
from aecompress.errors import AecompressError
from aecompress.models import EMBEDDED, _mapped_file_ranges, load_model, resolve_embedded
from tests.conftest import tiny_model


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


@pytest.fixture
def folder(tmp_path, tokenizer) -> Path:
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux memory maps")
def test_loaded_weights_own_their_memory_not_the_files_pages(folder):
    """A weight left in the memory-mapped checkpoint would keep the file's pages resident
    after the weight is replaced: every tensor is copied out, with the same values."""
    model = load_model(str(folder)).model
    ranges = _mapped_file_ranges()
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(low <= t.data_ptr() < high for t in tensors for low, high in ranges)
    saved = load_file(folder / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)


def drop_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_config(folder: Path, **changes: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def pickle_weights(folder: Path) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def corrupt_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text('{"version": ')


DAMAGES = {
    "missing tensor": (
        drop_tensor,
        "lack 1 tensor(s) of the model its config describes, e.g. "
        "model.layers.0.mlp.down_proj.weight",
    ),
    "more layers in the config": (partial(edit_config, num_hidden_layers=3), "model.layers.2."),
    "other sizes in the config": (
        partial(edit_config, intermediate_size=48),
        "its config does not match its weights "
        "(model.layers.0.mlp.down_proj.weight is [32, 64] in the weights, [32, 48] by",
    ),
    "fewer layers in the config": (
        partial(edit_config, num_hidden_layers=1),
        "hold layers its config does not have",
    ),
    "truncated weights": (truncate_weights, "cannot load model"),
    "pickle only": (pickle_weights, "holds only pickle weights (*.bin), which aecompress never"),
    "corrupt tokenizer": (corrupt_tokenizer, "cannot load the tokenizer"),
    "tokenizer.json deleted": (
        lambda folder: (folder / "tokenizer.json").unlink(),
        "has no vocabulary besides its special tokens",
    ),
}


@pytest.mark.parametrize("damage,message", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_model_folder_is_refused(folder, damage, message):
    damage(folder)
    with pytest.raises(AecompressError) as refused:
        load_model(str(folder))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_an_artifact_is_not_a_model_to_compress(folder, tmp_path):
    compressed = compress(load_model(str(folder)), method="svd", ratio=2, targets=["k"])
    compressed.save_pretrained(str(tmp_path / "art"))
    with pytest.raises(AecompressError, match="weights lack 2 tensor"):
        load_model(str(tmp_path / "art"))


def test_whole_texts_are_tokenised_without_the_length_warning(tokenizer, caplog):
    import copy

    from aecompress.models import tokenize_whole

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.deprecation_warnings.clear()  # transformers warns once per tokenizer
    text = "word " * (tokenizer.model_max_length + 10)
    with caplog.at_level("WARNING"):
        ids = tokenize_whole(tokenizer, text)["input_ids"]
    assert len(ids) > tokenizer.model_max_length
    assert "longer than the specified maximum" not in caplog.text
    with caplog.at_level("WARNING"):
        tokenizer(text)  # elsewhere the warning is transformers' as before
    assert "longer than the specified maximum" in caplog.text
