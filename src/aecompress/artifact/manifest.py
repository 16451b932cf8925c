"""The manifest, aecompress.json: a validated schema (unknown keys, wrong types and forged
sizes are refused) saying which method rebuilds each group and how, checked against what
the weights files hold (each one's name, bytes and sha256 recorded)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aecompress.budget import float_bits
from aecompress.errors import AecompressError, describe
from aecompress.outputs import MANIFEST, InsidePath, check_contained
from aecompress.recipe import Recipe

FORMAT = "aecompress-artifact"
FORMAT_VERSION = 4  # 3: sizes in bits (ratio of bits, number_ratio beside it); 4: shards
OLDEST_VERSION = 3  # read too: its single weights_file is weights_files' one entry
WEIGHTS = "model.safetensors"  # the weights of an artifact in one file
PREFIX = "aecompress."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberEntry(_Strict):
    path: str = Field(pattern=r"^[A-Za-z0-9_.]+$")
    layer: int | None
    kind: Literal["linear", "conv1d", "embedding", "ffn", "attn"]
    part: tuple[int, int] | None


class GroupEntry(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+\-\[\]/]+$")
    family: str
    method: str
    options: dict[str, Any]
    members: list[MemberEntry] = Field(min_length=1)
    shape: tuple[int, int]
    width: int | list[int]
    layout: dict[str, Any]
    info: dict[str, Any]
    tensors: dict[str, list[int]]
    original_params: int
    stored_params: int
    stored_bits: int
    ratio: float  # dense bits in the storage dtype / stored bits
    number_ratio: float  # original numbers / stored numbers (the paper's)


class SlicedEntry(_Strict):
    """The residual stream slicegpt cut (compressed.SlicedStream): the model's own tensors
    are the sliced ones, its config's hidden_size the width."""

    hidden_size: int = Field(gt=0)
    width: int = Field(gt=0)
    target_params: int = Field(gt=0)
    stored_params: int = Field(gt=0)
    model_params_dense: int = Field(gt=0)


class WeightsFile(_Strict):
    name: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def _inside_the_folder(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", value) or value.startswith("."):
            raise ValueError(f"'{value}' is not a file name inside the artifact folder")
        return value


class Manifest(_Strict):
    format: Literal["aecompress-artifact"]
    storage_dtype: Literal["float32", "bfloat16", "float16"]
    files: list[InsidePath]
    format_version: int
    aecompress_version: str
    base_model: str
    auto_class: Literal["AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM"]
    base_weights_sha256: str
    recipe: dict[str, Any]
    tied_output: str | None
    aliases: dict[str, str]
    groups: list[GroupEntry]
    sliced: SlicedEntry | None = None
    totals: dict[str, float]
    weights_files: list[WeightsFile] = Field(min_length=1)

    @field_validator("weights_files")
    @classmethod
    def _distinct_files(cls, files: list[WeightsFile]) -> list[WeightsFile]:
        names = [f.name for f in files]
        if len(set(names)) != len(names):
            raise ValueError("a weights file is listed twice")
        return files

    @field_validator("groups")
    @classmethod
    def _distinct_names(cls, groups: list[GroupEntry]) -> list[GroupEntry]:
        if clash := clashing_names([entry.name for entry in groups]):
            raise ValueError(f"groups {clash[0]} and {clash[1]} would share stored tensors")
        return groups

    @field_validator("recipe")
    @classmethod
    def _a_recipe(cls, value: dict[str, Any]) -> dict[str, Any]:
        Recipe.model_validate(value)  # kept as given, but a valid recipe
        return value


def clashing_names(names: list[str]) -> tuple[str, str] | None:
    """Two group names whose tensors would mix (the same name, or a and a.b: a group's
    tensors are the weights file's keys under `aecompress.<name>.`), or None."""
    seen: set[str] = set()
    for name in names:
        parts = name.split(".")
        leading = (".".join(parts[:end]) for end in range(1, len(parts) + 1))
        if found := next((n for n in leading if n in seen), None):
            return found, name
        if found := next((n for n in seen if n.startswith(f"{name}.")), None):
            return name, found
        seen.add(name)
    return None


def load_manifest(path: str | Path) -> Manifest:
    """The validated manifest of an artifact folder."""
    manifest_file = Path(path) / MANIFEST
    if not manifest_file.is_file():
        raise AecompressError(f"{path} is not an aecompress artifact (no {MANIFEST})")
    try:
        data = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AecompressError(f"{manifest_file} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise AecompressError(f"{path} is not an aecompress artifact (format {found!r})")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise AecompressError(f"{manifest_file}: format_version must be an integer")
    if version > FORMAT_VERSION:
        raise AecompressError(
            f"{path} has format version {version}; this aecompress reads up to "
            f"{FORMAT_VERSION}: upgrade aecompress"
        )
    if version < OLDEST_VERSION:
        raise AecompressError(
            f"{path} has format version {version}, written by an older aecompress: "
            "compress the model again"
        )
    if version == 3 and "weights_file" in data:  # one file: the list of one
        data["weights_files"] = [data.pop("weights_file")]
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as error:
        raise AecompressError(describe(error, f"{manifest_file}")) from error
    check_contained(Path(path))
    if missing := [name for name in manifest.files if not (Path(path) / name).exists()]:
        raise AecompressError(f"{path}: {missing[0]}, a file of the artifact, is missing")
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of an artifact folder, as JSON data."""
    return load_manifest(path).model_dump(mode="json")


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_storage_dtype(manifest: Manifest, floating: set[str]) -> None:
    """The weights files' floating tensors all have the manifest's storage dtype."""
    if floating - {manifest.storage_dtype}:
        raise AecompressError(
            f"the weights file holds {', '.join(sorted(floating))} tensors, the manifest "
            f"says {manifest.storage_dtype}"
        )


def check_groups(manifest: Manifest, header: dict[str, tuple[list[int], int]]) -> None:
    """Every group's tensors, counts, bits and ratios as the weights files say (no forged
    sizes); `header` gives each tensor's shape and bits per element in the files."""
    dense_bits = float_bits(manifest.storage_dtype)
    for entry in manifest.groups:
        prefix = f"{PREFIX}{entry.name}."
        found = {k[len(prefix) :]: h for k, h in header.items() if k.startswith(prefix)}
        if {k: shape for k, (shape, _) in found.items()} != entry.tensors:
            raise AecompressError(
                f"group {entry.name}: the manifest's tensors do not match the weights file"
            )
        stored = sum(torch.Size(s).numel() for s, _ in found.values())
        bits = sum(torch.Size(s).numel() * width for s, width in found.values())
        original = len(entry.members) * entry.shape[0] * entry.shape[1]
        if (stored, bits, original) != (
            entry.stored_params,
            entry.stored_bits,
            entry.original_params,
        ) or stored == 0:
            raise AecompressError(f"group {entry.name}: the manifest's counts are wrong")
        for name, value, expected in [
            ("ratio", entry.ratio, original * dense_bits / bits),
            ("number_ratio", entry.number_ratio, original / stored),
        ]:
            if abs(value - expected) > 1e-6 * expected:
                raise AecompressError(f"group {entry.name}: the manifest's {name} is wrong")
