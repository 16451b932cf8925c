"""The weights files: the untouched parameters under their usual names and each group's
stored tensors under `aecompress.<group>.<shared|member index>.<name>`, written one tensor
at a time in the storage dtype, in one `model.safetensors` or in shards as HF shards a
checkpoint (`model-0000i-of-0000N.safetensors` and `model.safetensors.index.json`); read
only after each file's size and sha256 match the manifest's record."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from aecompress.artifact.manifest import (
    FORMAT,
    WEIGHTS,
    Manifest,
    check_storage_dtype,
)
from aecompress.budget import STORAGE_DTYPES
from aecompress.errors import AecompressError
from aecompress.numerics import all_finite
from aecompress.tensorfile import (
    INDEX,
    SAFETENSORS_DTYPES,
    SafetensorsError,
    SafetensorsFiles,
    write_safetensors,
)

SHARD_BYTES = 4 * 2**30  # the largest weights file a save writes before it shards

# Bytes per element and the floating dtypes' names, by the dtype names of a file's header.
_ITEMSIZE = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}
_FLOAT_NAMES = {
    name: str(dtype).removeprefix("torch.")
    for dtype, name in SAFETENSORS_DTYPES.items()
    if dtype.is_floating_point
}


class ShardWriter:
    """Writes an artifact's weights as they come, a safetensors file per `write` (under a
    temporary name until `finish`): the untouched parameters under their usual names and
    the groups' stored tensors under their prefix, floating ones in the storage dtype."""

    def __init__(self, folder: Path, dtype_name: str) -> None:
        self.folder, self.dtype_name = folder, dtype_name
        self.written: list[tuple[Path, list[str]]] = []  # each shard and its keys
        self.tensor_bytes = 0  # of every tensor written, as the index's total_size

    def write(
        self,
        tensors: Mapping[str, torch.Tensor],
        values: Callable[[str], torch.Tensor] | None = None,
    ) -> None:
        """One shard of `tensors` (see tensorfile.write_safetensors for `values`); NaN or
        infinite numbers are refused."""
        path = self.folder / f".shard-{len(self.written):05d}.tmp"
        write_safetensors(
            path,
            tensors,
            STORAGE_DTYPES[self.dtype_name],
            {"format": "pt", "producer": FORMAT},
            check=partial(check_finite, dtype_name=self.dtype_name),
            values=values,
        )
        self.written.append((path, list(tensors)))
        self.tensor_bytes += sum(t.numel() * self._itemsize(t) for t in tensors.values())

    def write_split(self, tensors: Mapping[str, torch.Tensor], shard_bytes: int) -> None:
        """`tensors` in shards of at most `shard_bytes` each (or a tensor alone)."""
        shard: dict[str, torch.Tensor] = {}
        size = 0
        for key, tensor in tensors.items():
            nbytes = tensor.numel() * self._itemsize(tensor)
            if shard and size + nbytes > shard_bytes:
                self.write(shard)
                shard, size = {}, 0
            shard[key] = tensor
            size += nbytes
        if shard or not self.written:
            self.write(shard)

    def finish(self) -> list[dict[str, Any]]:
        """Name the shards: one is `model.safetensors`, several `model-0000i-of-0000N
        .safetensors` with the index HF writes beside them (`model.safetensors.index
        .json`); returns the manifest's records of the files (name, bytes, sha256)."""
        count = len(self.written)
        names = [WEIGHTS] if count == 1 else [shard_name(i, count) for i in range(count)]
        records, weight_map = [], {}
        for (path, keys), name in zip(self.written, names, strict=True):
            path.rename(self.folder / name)
            weights = self.folder / name
            records.append(
                {"name": name, "bytes": weights.stat().st_size, "sha256": _file_sha256(weights)}
            )
            weight_map.update(dict.fromkeys(keys, name))
        if count > 1:
            index = {
                "metadata": {"total_size": self.tensor_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return records

    def _itemsize(self, tensor: torch.Tensor) -> int:
        dtype = STORAGE_DTYPES[self.dtype_name] if tensor.is_floating_point() else tensor.dtype
        return dtype.itemsize


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def check_finite(key: str, tensor: torch.Tensor, dtype_name: str) -> None:
    """Refuse to save NaN or infinite numbers (e.g. values beyond float16's range)."""
    if not all_finite(tensor):
        raise AecompressError(
            f"{key} holds NaN or infinite values in {dtype_name}: not saving it "
            "(values beyond float16's range need --storage-dtype bfloat16 or float32)"
        )


def verify_weights(path: str | Path, manifest: Manifest) -> list[Path]:
    """The artifact's weights files, after checking each one's size and sha256 against the
    manifest."""
    found = []
    for record in manifest.weights_files:
        weights = Path(path) / record.name
        if not weights.is_file():
            raise AecompressError(f"{path}: {weights.name} is missing")
        if weights.stat().st_size != record.bytes or _file_sha256(weights) != record.sha256:
            raise AecompressError(f"{weights} is truncated or altered (size or sha256 mismatch)")
        found.append(weights)
    return found


def read_weights(path: str | Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The artifact's tensors (sizes and sha256s checked), every one finite, each read
    into memory of its own (no file mapped: the process holds the tensors once)."""
    tensors: dict[str, torch.Tensor] = {}
    for weights in verify_weights(path, manifest):
        try:
            found = SafetensorsFiles(weights)
            for key in found:  # non-finite values: saving refuses them (file altered)
                tensor = found.read(key)
                if not all_finite(tensor):
                    raise AecompressError(
                        f"{weights}: the tensor {key} holds NaN or infinite values"
                    )
                if key in tensors:
                    raise AecompressError(f"{weights}: the tensor {key} is in another file too")
                tensors[key] = tensor
        except SafetensorsError as error:
            raise AecompressError(f"cannot read {weights}: {error}") from error
    return tensors


def weights_header(path: str | Path, manifest: Manifest) -> dict[str, tuple[list[int], int]]:
    """Shape and bytes per element of every tensor in the (verified) weights files, read
    from their headers without loading the tensors."""
    header, floating = {}, set()
    for weights in verify_weights(path, manifest):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    view = handle.get_slice(key)
                    if key in header:
                        raise AecompressError(f"{weights}: the tensor {key} is in another file too")
                    header[key] = (list(view.get_shape()), _ITEMSIZE.get(view.get_dtype(), 4))
                    if view.get_dtype() in _FLOAT_NAMES:
                        floating.add(_FLOAT_NAMES[view.get_dtype()])
        except (SafetensorError, OSError) as error:
            raise AecompressError(f"cannot read {weights}: {error}") from error
    check_storage_dtype(manifest, floating)
    return header


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
