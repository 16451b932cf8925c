"""Safetensors a tensor at a time: the writer's files read back exactly by safetensors, the
reader gives what safetensors gives."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from aecompress.tensorfile import SafetensorsError, SafetensorsFiles, write_safetensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_written_files_load_with_safetensors(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(5, 3, generator=generator),
        "bits": torch.randint(-(2**31), 2**31 - 1, (7,), dtype=torch.int32, generator=generator),
        "mask": torch.rand(3, generator=generator) > 0.5,
        "odd": torch.randn(3, generator=generator),  # 3 bytes-per-2 sizes: offsets stay exact
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "w.safetensors"
    write_safetensors(path, tensors, dtype, {"format": "pt"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert sorted(handle.keys()) == sorted(tensors)
        for key, tensor in tensors.items():
            loaded = handle.get_tensor(key)
            expected = tensor.to(dtype) if tensor.is_floating_point() else tensor
            assert loaded.dtype == expected.dtype
            assert torch.equal(loaded, expected)


def test_the_check_sees_each_converted_tensor_before_it_is_written(tmp_path):
    seen = []

    def check(key, tensor):
        seen.append((key, tensor.dtype))
        if key == "bad":
            raise ValueError(key)

    tensors = {"good": torch.ones(2), "bad": torch.ones(2)}
    with pytest.raises(ValueError, match="bad"):
        write_safetensors(tmp_path / "w", tensors, torch.float16, {}, check=check)
    assert seen == [("good", torch.float16), ("bad", torch.float16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_the_reader_gives_each_tensor_as_safetensors_does(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a": (torch.randn(5, 3, generator=generator) * 100).to(dtype),
        "b": (torch.randn(7, generator=generator) * 100).to(dtype),
        "empty": torch.zeros(0, 2, dtype=dtype),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = SafetensorsFiles(tmp_path)
    assert sorted(files.keys()) == sorted(tensors)
    for key, tensor in tensors.items():
        assert files.header(key) == (dtype, tuple(tensor.shape))
        assert torch.equal(files.read(key), tensor)
        upcast = files.read(key, torch.float64)
        assert upcast.dtype == (torch.float64 if dtype.is_floating_point else dtype)
        assert torch.equal(upcast, tensor.to(upcast.dtype))


def test_the_reader_follows_a_sharded_checkpoints_index(tmp_path):
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    files = SafetensorsFiles(tmp_path)
    assert len(files.files) > 1
    state = model.state_dict()
    assert set(files.keys()) == set(state)
    for key, tensor in state.items():
        assert torch.equal(files.read(key), tensor)


def test_the_reader_refuses_missing_tensors_and_truncated_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(1000)}, str(path))
    files = SafetensorsFiles(path)
    with pytest.raises(SafetensorsError, match="no tensor b"):
        files.read("b")
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(SafetensorsError, match="outside the file"):
        SafetensorsFiles(path)
