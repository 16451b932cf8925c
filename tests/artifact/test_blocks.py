"""ArtifactBlocks fills an artifact's model a block at a time with the modules load builds:
streamed outputs equal the in-memory artifact's."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import aecompress
from aecompress.artifact import MANIFEST, WEIGHTS
from aecompress.artifact.blocks import ArtifactBlocks
from aecompress.errors import AecompressError
from aecompress.evaluation.multiple_choice import multiple_choice
from aecompress.evaluation.perplexity import perplexity
from aecompress.evaluation.streamed import StreamedForward
from tests.conftest import compressed_tiny

CPU = torch.device("cpu")
SETTINGS = {"windows": 2, "seq_len": 24, "batch_size": 1, "progress": False}

RECIPES = {
    # a basis shared by the k matrices of both blocks
    "llama-shared": ("llama", {"method": "svd", "targets": ["k", "up"], "group": "layers"}),
    # the tied embedding and head, outside the blocks
    "llama-embed": ("llama", {"method": "svd", "targets": ["embed", "v"]}),
    # a part of GPT-2's fused c_attn
    "gpt2-fused": ("gpt2", {"method": "svd", "targets": ["q", "down"]}),
    "llama-sparsegpt": ("llama", {"method": "sparsegpt", "targets": ["o", "gate"]}),
}


def _streamed(path) -> tuple[ArtifactBlocks, StreamedForward]:
    source = ArtifactBlocks(path)
    source.load_outside(source.outside_paths(), CPU)
    return source, StreamedForward(source, CPU)


@pytest.mark.parametrize("case", RECIPES)
def test_streamed_perplexity_equals_the_loaded_artifacts(case, tokenizer, tmp_path):
    arch, recipe = RECIPES[case]
    compressed_tiny(tokenizer, arch, **recipe).save_pretrained(tmp_path / "art")
    loaded = aecompress.load(tmp_path / "art")
    expected = perplexity(loaded, tokenizer, **SETTINGS).perplexity
    source, forward = _streamed(tmp_path / "art")
    streamed = perplexity(source.model, tokenizer, forward=forward, **SETTINGS).perplexity
    assert streamed == pytest.approx(expected, rel=1e-6)


def test_a_sharded_artifact_streams_to_the_loaded_artifacts_numbers(
    tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setattr("aecompress.artifact.save.SHARD_BYTES", 64 * 1024)
    arch, recipe = RECIPES["llama-embed"]
    compressed_tiny(tokenizer, arch, **recipe).save_pretrained(tmp_path / "art")
    assert len(list((tmp_path / "art").glob("model-*-of-*.safetensors"))) > 2
    expected = perplexity(aecompress.load(tmp_path / "art"), tokenizer, **SETTINGS)
    source, forward = _streamed(tmp_path / "art")
    found = perplexity(source.model, tokenizer, forward=forward, **SETTINGS)
    assert found.perplexity == pytest.approx(expected.perplexity, rel=1e-6)


def test_streamed_multiple_choice_equals_the_loaded_artifacts(tokenizer, tmp_path):
    arch, recipe = RECIPES["llama-shared"]
    compressed_tiny(tokenizer, arch, **recipe).save_pretrained(tmp_path / "art")
    settings = {"limit": 4, "batch_size": 3, "progress": False}
    expected = multiple_choice("piqa", aecompress.load(tmp_path / "art"), tokenizer, **settings)
    source, forward = _streamed(tmp_path / "art")
    found = multiple_choice("piqa", source.model, tokenizer, forward=forward, **settings)
    assert found == pytest.approx(expected, rel=1e-6)


def test_a_block_holds_weights_only_while_loaded(tokenizer, tmp_path):
    arch, recipe = RECIPES["llama-shared"]
    compressed_tiny(tokenizer, arch, **recipe).save_pretrained(tmp_path / "art")
    source = ArtifactBlocks(tmp_path / "art")
    assert all(p.is_meta for p in source.model.parameters())
    source.load(1, CPU)
    loaded = [n for n, p in source.model.named_parameters() if not p.is_meta]
    assert loaded and all(n.startswith(f"{source.blocks_path}.1.") for n in loaded)
    assert any("k_proj" in n for n in loaded)  # the group's serving module, filled
    source.release(1)
    assert all(p.is_meta for p in source.model.parameters())


def test_an_altered_weights_file_is_refused(tokenizer, tmp_path):
    compressed_tiny(tokenizer, "llama").save_pretrained(tmp_path / "art")
    weights = next((tmp_path / "art").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(AecompressError, match="truncated or altered"):
        ArtifactBlocks(tmp_path / "art")


@pytest.mark.real
def test_a_smollm2_artifact_streams_to_its_in_memory_perplexity(smollm2, tmp_path):
    import copy

    model = copy.deepcopy(smollm2.model)
    compressed = aecompress.compress(
        model, method="svd", ratio=2, targets=["k", "v"], group="layers", progress=False
    )
    compressed.tokenizer = smollm2.tokenizer
    compressed.save_pretrained(str(tmp_path / "art"))
    del model, compressed
    settings = {"windows": 2, "seq_len": 128, "batch_size": 1, "progress": False}
    expected = perplexity(aecompress.load(tmp_path / "art"), smollm2.tokenizer, **settings)
    source, forward = _streamed(tmp_path / "art")
    found = perplexity(source.model, smollm2.tokenizer, forward=forward, **settings)
    assert found.perplexity == pytest.approx(expected.perplexity, rel=1e-6)


def test_a_tensor_the_model_does_not_have_is_refused(tokenizer, tmp_path):
    compressed_tiny(tokenizer, "llama").save_pretrained(tmp_path / "art")
    weights = tmp_path / "art" / WEIGHTS
    tensors = load_file(weights)
    stranger = torch.zeros(2, dtype=torch.bfloat16)
    save_file({**tensors, "stranger.weight": stranger}, weights, {"format": "pt"})
    manifest = json.loads((tmp_path / "art" / MANIFEST).read_text())
    (record,) = manifest["weights_files"]
    record["bytes"] = weights.stat().st_size
    record["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / "art" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AecompressError, match=r"unknown tensors: \['stranger.weight'\]"):
        ArtifactBlocks(tmp_path / "art")
