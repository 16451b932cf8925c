"""Loading: the model an artifact rebuilds computes what was saved; damage is refused."""

import json

import pytest
import torch

import aecompress
from aecompress.artifact import MANIFEST, WEIGHTS
from aecompress.errors import AecompressError
from tests.conftest import FAMILIES, compressed_tiny, tiny_model


@pytest.mark.parametrize("grouping", ["none", "layers"])
def test_round_trip_gives_identical_logits(arch, grouping, tokenizer, tmp_path, input_ids):
    model = tiny_model(arch)
    cm = aecompress.compress(
        model,
        method="svd",
        ratio=2.5,
        targets=FAMILIES[arch],
        group=grouping,
        tokenizer=tokenizer,
        progress=False,
    )
    expected = cm.model(input_ids=input_ids).logits
    cm.save_pretrained(str(tmp_path / "art"))
    loaded = aecompress.load(tmp_path / "art")
    assert torch.equal(loaded(input_ids=input_ids).logits, expected)
    decoded = aecompress.load(tmp_path / "art", decode=True)
    torch.testing.assert_close(decoded(input_ids=input_ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_truncated_or_foreign_artifacts_fail_clearly(tokenizer, tmp_path):
    cm = compressed_tiny(tokenizer)
    cm.save_pretrained(str(tmp_path / "art"))
    weights = tmp_path / "art" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AecompressError, match="truncated"):
        aecompress.load(tmp_path / "art")
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        aecompress.load(tmp_path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        aecompress.load(tmp_path / "foreign")


def test_tie_weights_leaves_a_head_served_from_the_embeddings_factors(tokenizer, tmp_path):
    cm = compressed_tiny(tokenizer, "llama", targets=["embed"])
    cm.save_pretrained(tmp_path / "art")
    model = aecompress.load(tmp_path / "art")
    ids = torch.tensor([[5, 17, 42]])
    expected = model(input_ids=ids).logits
    model.tie_weights()  # lm-eval's HFLM and other tools call it
    assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("stored", [True, False])
def test_non_finite_tensors_are_refused_with_a_consistent_sha256(artifact, stored):
    """A weights file altered to hold a NaN, its size and sha256 made to match."""
    from safetensors.torch import load_file, save_file

    from aecompress.artifact.weights import _file_sha256

    weights = artifact / WEIGHTS
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.startswith("aecompress.") == stored)
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["weights_files"][0].update(bytes=weights.stat().st_size, sha256=_file_sha256(weights))
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AecompressError, match=f"the tensor {key} holds NaN or infinite values"):
        aecompress.load(artifact)


@pytest.mark.parametrize("storage", ["bfloat16", "float32"])
def test_lazy_keeps_sparse_matrices_stored_and_computes_the_same(
    tokenizer, tmp_path, storage, monkeypatch, caplog
):
    cm = compressed_tiny(
        tokenizer, "llama", method="prune", targets=["up", "k"], storage_dtype=storage
    )
    cm.save_pretrained(tmp_path / "art")
    ids = torch.tensor([[5, 17, 42, 7]])
    runtime = aecompress.load(tmp_path / "art")  # decoded once: enough memory here
    up = runtime.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(up, torch.nn.Linear) and up.weight.dtype == torch.float32
    monkeypatch.setattr("aecompress.memory.available_memory", lambda: 2**20)
    lazy = aecompress.load(tmp_path / "art")
    assert "decoded on each call" in caplog.text
    up = lazy.get_submodule("model.layers.0.mlp.up_proj")
    assert not isinstance(up, torch.nn.Linear)
    held = {t.dtype for t in up.parameters() if t.is_floating_point()}
    assert held == {getattr(torch, storage)}  # the stored values, in the artifact's dtype
    with torch.no_grad():
        assert torch.equal(lazy(input_ids=ids).logits, runtime(input_ids=ids).logits)
