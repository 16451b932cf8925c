"""The weights file, model.safetensors: the untouched parameters under their usual names and
each group's stored tensors under `aecompress.<group>.<shared|member index>.<name>`, written
one tensor at a time in the storage dtype; read only after its size and sha256 match the
manifest's record."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from aecompress.artifact.manifest import (
    FORMAT,
    WEIGHTS,
    Manifest,
    check_storage_dtype,
)
from aecompress.budget import STORAGE_DTYPES
from aecompress.errors import AecompressError
from aecompress.numerics import all_finite
from aecompress.tensorfile import SAFETENSORS_DTYPES, write_safetensors

# Bytes per element and the floating dtypes' names, by the dtype names of a file's header.
_ITEMSIZE = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}
_FLOAT_NAMES = {
    name: str(dtype).removeprefix("torch.")
    for dtype, name in SAFETENSORS_DTYPES.items()
    if dtype.is_floating_point
}


def write_weights(
    folder: Path, tensors: Mapping[str, torch.Tensor], dtype_name: str
) -> dict[str, Any]:
    """Write the weights file into `folder`, floating tensors in `dtype_name`; returns the
    manifest's record of it (name, bytes, sha256)."""
    weights = folder / WEIGHTS
    write_safetensors(
        weights,
        tensors,
        STORAGE_DTYPES[dtype_name],
        {"format": "pt", "producer": FORMAT},
        check=partial(check_finite, dtype_name=dtype_name),
    )
    return {"name": WEIGHTS, "bytes": weights.stat().st_size, "sha256": _file_sha256(weights)}


def check_finite(key: str, tensor: torch.Tensor, dtype_name: str) -> None:
    """Refuse to save NaN or infinite numbers (e.g. values beyond float16's range)."""
    if not all_finite(tensor):
        raise AecompressError(
            f"{key} holds NaN or infinite values in {dtype_name}: not saving it "
            "(values beyond float16's range need --storage-dtype bfloat16 or float32)"
        )


def verify_weights(path: str | Path, manifest: Manifest) -> Path:
    """The artifact's weights file, after checking its size and sha256 against the manifest."""
    weights = Path(path) / manifest.weights_file.name
    if not weights.is_file():
        raise AecompressError(f"{path}: {weights.name} is missing")
    if (
        weights.stat().st_size != manifest.weights_file.bytes
        or _file_sha256(weights) != manifest.weights_file.sha256
    ):
        raise AecompressError(f"{weights} is truncated or altered (size or sha256 mismatch)")
    return weights


def read_weights(path: str | Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The artifact's tensors (size and sha256 checked), every one finite."""
    weights = verify_weights(path, manifest)
    try:
        tensors = load_file(str(weights))
    except SafetensorError as error:
        raise AecompressError(f"cannot read {weights}: {error}") from error
    for key, tensor in tensors.items():  # saving refuses them: a file holding them was altered
        if not all_finite(tensor):
            raise AecompressError(f"{weights}: the tensor {key} holds NaN or infinite values")
    return tensors


def weights_header(path: str | Path, manifest: Manifest) -> dict[str, tuple[list[int], int]]:
    """Shape and bytes per element of every tensor in the (verified) weights file, read
    from its header without loading the tensors."""
    weights = verify_weights(path, manifest)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            header, floating = {}, set()
            for key in handle.keys():  # noqa: SIM118
                view = handle.get_slice(key)
                itemsize = _ITEMSIZE.get(view.get_dtype(), 4)
                header[key] = (list(view.get_shape()), itemsize)
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
