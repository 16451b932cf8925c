"""A model's blocks filled from a checkpoint one at a time: the same tensors, the same
outputs and the same weights hash as the model loaded whole, without its memory."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from aecompress.errors import AecompressError
from aecompress.models import load_model, weights_sha256
from aecompress.pipeline.streams import capture_block_inputs, run_blocks
from aecompress.streaming import CheckpointBlocks, checkpoint_sha256, skeleton_from_checkpoint
from tests.conftest import make_tiny

CPU = torch.device("cpu")


def saved(tmp_path, arch="llama", dtype=torch.bfloat16, **kwargs):
    """A tiny model saved as a safetensors checkpoint in `dtype`; its folder."""
    folder = tmp_path / f"{arch}-{dtype}".replace("torch.", "")
    make_tiny(arch).to(dtype).save_pretrained(folder, **kwargs)
    return folder


def source_of(folder, auto_class="AutoModelForCausalLM"):
    return CheckpointBlocks(skeleton_from_checkpoint(folder, auto_class), folder)


def test_the_skeleton_holds_no_weights_and_keeps_ties(tmp_path):
    skeleton = skeleton_from_checkpoint(saved(tmp_path), "AutoModelForCausalLM")
    assert all(p.is_meta for p in skeleton.parameters())
    assert all(not b.is_meta for b in skeleton.buffers())
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_blocks_load_as_the_whole_model_does_and_release_their_memory(tmp_path, dtype, shard):
    folder = saved(tmp_path, dtype=dtype, **({"max_shard_size": shard} if shard else {}))
    whole = load_model(str(folder)).model
    source = source_of(folder)
    for index in range(len(source.blocks)):
        source.load(index, CPU)
        loaded = dict(source.blocks[index].named_parameters())
        expected = dict(whole.model.layers[index].named_parameters())
        assert loaded.keys() == expected.keys()
        for name, tensor in loaded.items():
            assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name])
        source.release(index)
        assert all(p.is_meta for p in source.blocks[index].parameters())
    assert all(p.is_meta for p in source.model.parameters())


def test_outside_modules_load_with_their_ties_and_stay_out_of_the_blocks(tmp_path):
    source = source_of(saved(tmp_path))
    assert source.outside_paths() == ["model.embed_tokens", "lm_head", "model.norm"]
    source.load_outside(["lm_head"], CPU)
    model = source.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta and model.model.norm.weight.is_meta
    source.load_outside(["model"], CPU)  # everything under model. but the blocks
    assert not model.model.norm.weight.is_meta
    assert all(p.is_meta for p in model.model.layers.parameters())
    source.release_outside(["model.embed_tokens"])
    assert model.lm_head.weight.is_meta and model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="inside the blocks"):
        source.load_outside(["model.layers.0"], CPU)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_pass_block_by_block_computes_what_the_whole_model_does(tmp_path, arch, small_ids):
    folder = saved(tmp_path, arch, torch.float32)
    whole = load_model(str(folder)).model
    source = source_of(folder)
    source.load_outside(source.outside_paths(), CPU)
    (hidden,), (inputs,) = capture_block_inputs(source.model, source.blocks[0], small_ids, 2)
    with torch.no_grad():
        for index in range(len(source.blocks)):
            source.load(index, CPU)
            hidden = run_blocks([source.blocks[index]], hidden, inputs)
            source.release(index)
        expected = whole(input_ids=small_ids, output_hidden_states=True).hidden_states[-1]
    final_norm = source.model.get_submodule("model.norm" if arch == "llama" else "transformer.ln_f")
    assert torch.allclose(final_norm(hidden), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_the_weights_hash_is_the_whole_models(tmp_path, arch, dtype):
    folder = saved(tmp_path, arch, dtype)
    loaded = load_model(str(folder))
    source = source_of(folder, loaded.auto_class)
    assert checkpoint_sha256(source) == weights_sha256(loaded.model)


def test_a_checkpoint_without_a_tensor_of_the_config_is_refused(tmp_path):
    folder = saved(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AecompressError, match=r"lacks the tensor model\.layers\.1\.mlp\.up_proj"):
        source_of(folder)
