"""Safetensors files one tensor at a time, both ways.

Writing: each floating tensor is converted to the storage dtype just before its bytes are
written, so saving never holds a converted copy of the whole model (safetensors' own
save_file wants every converted tensor at once). Reading (SafetensorsFiles): one tensor by
name, with plain file reads into a fresh buffer: not a memory map, whose touched pages stay
resident, so a model read tensor by tensor never holds more than the tensors kept.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian
header length, a JSON header naming each tensor's dtype, shape and byte range, then the
tensors' bytes back to back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
INDEX = "model.safetensors.index.json"  # a sharded checkpoint's weight_map


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    float_dtype: torch.dtype,
    metadata: Mapping[str, str],
    check: Callable[[str, torch.Tensor], None] | None = None,
    values: Callable[[str], torch.Tensor] | None = None,
) -> None:
    """Write `tensors` to `path`, floating ones in `float_dtype`; `check(key, converted)`
    sees each converted tensor before it is written (and may raise). With `values`, the
    tensor written under a key is `values(key)`, read just before it is written, and
    `tensors` only give shapes and dtypes (meta tensors do)."""

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
            if values is not None:
                tensor = values(key)
            converted = tensor.detach().to("cpu", stored_dtype(tensor)).contiguous()
            if check is not None:
                check(key, converted)
            handle.write(converted.reshape(-1).view(torch.uint8).numpy().data)


class SafetensorsError(ValueError):
    """A file that is not safetensors, or a tensor it does not hold."""


@dataclass(frozen=True)
class _Entry:
    path: Path
    start: int  # absolute offset of the tensor's bytes in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class SafetensorsFiles:
    """The tensors of a safetensors checkpoint: a folder (its `model.safetensors`, or the
    shards its `model.safetensors.index.json` lists, else every *.safetensors file in
    it), one file, or a list of files. Only the headers are read up front."""

    def __init__(self, where: str | Path | list[Path]) -> None:
        self.files = checkpoint_files(where)
        self._entries: dict[str, _Entry] = {}
        for path in self.files:
            self._entries.update(_read_header(path))

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def header(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The tensor's dtype and shape in the file."""
        entry = self._entry(key)
        return entry.dtype, entry.shape

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key` in the file's dtype, or converted to `dtype` (a floating
        tensor only: integers keep theirs)."""
        entry = self._entry(key)
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)
        with entry.path.open("rb") as handle:
            handle.seek(entry.start)
            if handle.readinto(raw.numpy().data) != entry.nbytes:
                raise SafetensorsError(f"{entry.path} is truncated ({key})")
        tensor = raw.view(entry.dtype).reshape(entry.shape)
        if dtype is not None and tensor.is_floating_point() and dtype != tensor.dtype:
            return tensor.to(dtype)
        return tensor

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise SafetensorsError(f"no tensor {key} in {_names(self.files)}") from None


def checkpoint_files(where: str | Path | list[Path]) -> list[Path]:
    """The safetensors files of a checkpoint folder (see SafetensorsFiles), a file or a
    list of files."""
    if isinstance(where, list):
        return [Path(p) for p in where]
    where = Path(where)
    if not where.is_dir():
        return [where]
    if (where / INDEX).is_file():
        try:
            weight_map = json.loads((where / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SafetensorsError(f"{where / INDEX} has no weight_map") from error
        return [where / name for name in dict.fromkeys(weight_map.values())]
    if (where / "model.safetensors").is_file():
        return [where / "model.safetensors"]
    return sorted(where.glob("*.safetensors"))


def _read_header(path: Path) -> dict[str, _Entry]:
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        size = path.stat().st_size
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SafetensorsError(f"cannot read {path}: {error}") from error
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} is not a safetensors file")
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (8 + length + offset for offset in info["data_offsets"])
            dtype, shape = DTYPES_BY_NAME[info["dtype"]], tuple(info["shape"])
        except (KeyError, TypeError, ValueError) as error:
            raise SafetensorsError(f"{path}: malformed header entry {key}") from error
        if end > size or end - begin != dtype.itemsize * torch.Size(shape).numel():
            raise SafetensorsError(f"{path}: {key} lies outside the file or has a wrong size")
        entries[key] = _Entry(path, begin, end - begin, dtype, shape)
    return entries


def _names(files: list[Path]) -> str:
    return ", ".join(str(f) for f in files[:2]) + (" ..." if len(files) > 2 else "")
