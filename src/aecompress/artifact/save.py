"""Saving a CompressedModel as an artifact folder: config, tokenizer, the weights file and
the manifest, written last; the folder appears atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

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
from aecompress.artifact.weights import write_weights
from aecompress.budget import STORAGE_DTYPES
from aecompress.compressed import CompressedGroup, CompressedModel, register_writer
from aecompress.errors import AecompressError
from aecompress.outputs import check_artifact_folder, files_under
from aecompress.substitution import Serving, inject
from aecompress.version import __version__


@register_writer  # what CompressedModel.save_pretrained calls
def save_artifact(cm: CompressedModel, path: str | Path) -> Path:
    """Write `cm` to the folder `path` atomically (a crash leaves no half artifact).

    An existing artifact there is replaced; a folder holding anything else is refused."""
    if cm.decoded:
        raise AecompressError("a model loaded with decode=True has no stored form to save")
    if cm.tokenizer is None:
        raise AecompressError(
            "no tokenizer to save, and an artifact without one cannot be evaluated: pass "
            "tokenizer= to aecompress.compress (or compress a model name or folder)"
        )
    path = check_artifact_folder(Path(path))
    if clash := clashing_names([fitted.group.name for fitted in cm.groups]):
        raise AecompressError(f"groups {clash[0]} and {clash[1]} would share stored tensors")
    untouched, aliases = untouched_state(cm)
    cm.aliases = aliases
    tensors = dict(untouched)
    for fitted in cm.groups:
        for key, tensor in fitted.stored.tensors().items():
            tensors[f"{PREFIX}{fitted.group.name}.{key}"] = tensor.detach().contiguous()
    dtype = STORAGE_DTYPES[cm.storage_dtype]
    manifest = build_manifest(cm, untouched)
    with atomic_folder(path) as work:
        cm.model.config.save_pretrained(work)
        _strip_quantization(work / "config.json")
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(work)
        copy_sentence_transformers_files(Path(str(cm.model.name_or_path)), work)
        manifest["weights_file"] = write_weights(work, tensors, cm.storage_dtype)
        totals = manifest["totals"]
        totals["artifact_bytes"] = manifest["weights_file"]["bytes"]
        totals["dense_fp32_bytes"] = 4 * totals["model_params_dense"]
        totals["dense_storage_dtype_bytes"] = dtype.itemsize * totals["model_params_dense"]
        manifest["files"] = sorted([*files_under(work), MANIFEST])
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def untouched_state(cm: CompressedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parameters and buffers not rebuilt from stored tensors; shared ones kept once.

    Returns the tensors and the aliases (dropped key -> kept key) of tied tensors.
    """
    replaced = [p + "." for p in cm.replaced_paths()]
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, tensor in cm.model.state_dict().items():
        if any(key.startswith(p) for p in replaced) and not key.endswith(".bias"):
            continue
        pointer = (tensor.data_ptr(), tuple(tensor.shape))
        if pointer in seen:
            aliases[key] = seen[pointer]
            continue
        seen[pointer] = key
        state[key] = tensor.detach().contiguous()
    return state, aliases


def build_manifest(cm: CompressedModel, untouched: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The manifest but for what writing the folder adds (weights file, files, bytes)."""
    untouched_numel = sum(t.numel() for t in untouched.values())
    totals = cm.totals()
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
        "totals": {
            **totals,
            "model_params_dense": untouched_numel + totals["target_params"],
            "model_params_artifact": untouched_numel + totals["stored_params"],
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
