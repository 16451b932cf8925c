"""Writing a safetensors file one tensor at a time: each floating tensor is converted to the
storage dtype just before its bytes are written, so saving never holds a converted copy of
the whole model (safetensors' own save_file wants every converted tensor at once).

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian
header length, a JSON header naming each tensor's dtype, shape and byte range, then the
tensors' bytes back to back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    float_dtype: torch.dtype,
    metadata: Mapping[str, str],
    check: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """Write `tensors` to `path`, floating ones in `float_dtype`; `check(key, converted)`
    sees each converted tensor before it is written (and may raise)."""

    def stored_dtype(tensor: torch.Tensor) -> torch.dtype:
        return float_dtype if tensor.is_floating_point() else tensor.dtype

    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, tensor in tensors.items():
        dtype = stored_dtype(tensor)
        size = tensor.numel() * dtype.itemsize
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for key, tensor in tensors.items():
            converted = tensor.detach().to("cpu", stored_dtype(tensor)).contiguous()
            if check is not None:
                check(key, converted)
            handle.write(converted.reshape(-1).view(torch.uint8).numpy().data)
