"""Saving a CompressedModel as an artifact folder: config, tokenizer, the weights files and
the manifest, written last; the folder appears atomically. The pieces are shared with
streamed compression, which writes the weights a block at a time as it goes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from aecompress.artifact.folder import (
    atomic_folder,
    copy_sentence_transformers_files,
)
from aecompress.artifact.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PREFIX,
    clashing_names,
)
from aecompress.artifact.weights import SHARD_BYTES, ShardWriter
from aecompress.budget import STORAGE_DTYPES
from aecompress.compressed import CompressedGroup, CompressedModel, register_writer
from aecompress.errors import AecompressError
from aecompress.outputs import check_artifact_folder, files_under
from aecompress.substitution import Serving, inject
from aecompress.version import __version__


@register_writer  # what CompressedModel.save_pretrained calls
def save_artifact(cm: CompressedModel, path: str | Path) -> Path:
    """Write `cm` to the folder `path` atomically (a crash leaves no half artifact): one
    weights file, or shards of SHARD_BYTES when larger.

    An existing artifact there is replaced; a folder holding anything else is refused."""
    if cm.decoded:
        raise AecompressError("a model loaded with decode=True has no stored form to save")
    path = check_artifact_path(path, cm.tokenizer)
    check_group_names([fitted.group.name for fitted in cm.groups])
    untouched, cm.aliases = untouched_state(cm.model, cm.replaced_paths())
    tensors = {**untouched, **stored_state(cm.groups)}
    with atomic_folder(path) as work:
        writer = ShardWriter(work, cm.storage_dtype)
        writer.write_split(tensors, SHARD_BYTES)
        finish_artifact(work, cm, writer.finish(), sum(t.numel() for t in untouched.values()))
    return path


def check_artifact_path(path: str | Path, tokenizer: PreTrainedTokenizerBase | None) -> Path:
    """`path` once an artifact may be written there (checked before any work)."""
    if tokenizer is None:
        raise AecompressError(
            "no tokenizer to save, and an artifact without one cannot be evaluated: pass "
            "tokenizer= to aecompress.compress (or compress a model name or folder)"
        )
    return check_artifact_folder(Path(path))


def check_group_names(names: list[str]) -> None:
    """Refuse groups whose stored tensors would mix in the weights files."""
    if clash := clashing_names(names):
        raise AecompressError(f"groups {clash[0]} and {clash[1]} would share stored tensors")


def stored_state(groups: list[CompressedGroup]) -> dict[str, torch.Tensor]:
    """The groups' stored tensors under their names in the weights files."""
    return {
        f"{PREFIX}{fitted.group.name}.{key}": tensor.detach()
        for fitted in groups
        for key, tensor in fitted.stored.tensors().items()
    }


def finish_artifact(
    work: Path, cm: CompressedModel, weights_files: list[dict[str, Any]], untouched_numel: int
) -> None:
    """Write beside the weights files (`weights_files`: their records) the config, the
    tokenizer, a sentence encoder's files and, last, the manifest."""
    manifest = build_manifest(cm, untouched_numel)
    cm.model.config.save_pretrained(work)
    _strip_quantization(work / "config.json")
    if cm.tokenizer is not None:
        cm.tokenizer.save_pretrained(work)
    copy_sentence_transformers_files(Path(str(cm.model.name_or_path)), work)
    manifest["weights_files"] = weights_files
    totals = manifest["totals"]
    totals["artifact_bytes"] = sum(record["bytes"] for record in weights_files)
    totals["dense_fp32_bytes"] = 4 * totals["model_params_dense"]
    dtype = STORAGE_DTYPES[cm.storage_dtype]
    totals["dense_storage_dtype_bytes"] = dtype.itemsize * totals["model_params_dense"]
    manifest["files"] = sorted([*files_under(work), MANIFEST])
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def untouched_state(
    model: nn.Module, replaced_paths: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parameters and buffers not rebuilt from stored tensors (the modules at
    `replaced_paths` but their biases); shared ones kept once. Parameters on the meta
    device (a streamed model's) are shared when they are one object.

    Returns the tensors and the aliases (dropped key -> kept key) of tied tensors.
    """
    replaced = [p + "." for p in replaced_paths]
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[object, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if any(key.startswith(p) for p in replaced) and not key.endswith(".bias"):
            continue
        pointer = id(tensor) if tensor.is_meta else (tensor.data_ptr(), tuple(tensor.shape))
        if pointer in seen:
            aliases[key] = seen[pointer]
            continue
        seen[pointer] = key
        state[key] = tensor.detach()
    return state, aliases


def build_manifest(cm: CompressedModel, untouched_numel: int) -> dict[str, Any]:
    """The manifest but for what writing the folder adds (weights files, files, bytes)."""
    totals = cm.totals()
    groups_original = sum(g.original_numel for g in cm.groups)
    groups_stored = sum(g.stored_numel for g in cm.groups)
    # a sliced stream's matrices are untouched tensors; its base model is counted apart
    dense = cm.sliced.model_params_dense if cm.sliced else untouched_numel + groups_original
    # only a sliced model's manifest has the key: the others stay what earlier versions read
    sliced = {"sliced": dataclasses.asdict(cm.sliced)} if cm.sliced else {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "aecompress_version": __version__,
        "base_model": cm.base_model,
        "auto_class": cm.auto_class,
        "base_weights_sha256": cm.base_sha256,
        "recipe": cm.recipe,
        "storage_dtype": cm.storage_dtype,
        "tied_output": cm.tied_output,
        "aliases": cm.aliases,
        "groups": [group_entry(g) for g in cm.groups],
        **sliced,
        "totals": {
            **totals,
            "model_params_dense": dense,
            "model_params_artifact": untouched_numel + groups_stored,
        },
    }


def group_entry(fitted: CompressedGroup) -> dict[str, Any]:
    width = fitted.stored.width
    return {
        "name": fitted.group.name,
        "family": fitted.group.family,
        "method": fitted.method.name,
        "options": fitted.method.options.model_dump(mode="json"),
        "members": [
            {"path": t.path, "layer": t.layer, "kind": t.kind, "part": t.part}
            for t in fitted.group.members
        ],
        "shape": list(fitted.shape),
        "width": list(width) if isinstance(width, tuple) else width,
        "layout": fitted.stored.layout.model_dump(mode="json"),
        "info": fitted.stored.info,
        "tensors": {k: list(t.shape) for k, t in fitted.stored.tensors().items()},
        "original_params": fitted.original_numel,
        "stored_params": fitted.stored_numel,
        "stored_bits": fitted.stored_bits,
        "ratio": fitted.ratio,
        "number_ratio": fitted.number_ratio,
    }


def round_to_storage(cm: CompressedModel, dtype_name: str, serving: Serving = "runtime") -> None:
    """Give every floating tensor of the model the precision it will be stored with (kept
    in its own dtype), so that the model in memory computes what the artifact will; the
    groups' modules are built again from the rounded stored tensors (`serving`)."""
    cm.storage_dtype = dtype_name
    dtype = STORAGE_DTYPES[dtype_name]
    tensors = list(cm.model.state_dict(keep_vars=True).values())  # what is saved
    tensors += [t for g in cm.groups for t in g.stored.tensors().values()]
    with torch.no_grad():
        for tensor in {id(t): t for t in tensors}.values():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.copy_(tensor.to(dtype))
    for fitted in cm.groups:
        tied = cm.tied_output if fitted.group.family == "embed" else None
        inject(cm.model, fitted.group, fitted.method, fitted.stored, tied, serving)


def _strip_quantization(config_file: Path) -> None:
    """The artifact stores fp32 weights: drop a GGUF source's quantization_config."""
    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
