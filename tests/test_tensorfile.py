"""The streaming safetensors writer: files safetensors itself reads back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from aecompress.tensorfile import write_safetensors


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
