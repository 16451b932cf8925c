"""Exporting an artifact's model as a folder that loads without aecompress.

A format is a function that checks its output folder before any work, loads the artifact
and writes its model into the folder `_export_folder` gives, which then receives the base's
tokenizer and a sentence encoder's pooling files and appears atomically."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from aecompress.artifact.compressed_tensors import (
    check_exportable,
    module_tensors,
    quantization_config,
)
from aecompress.artifact.folder import atomic_folder, copy_sentence_transformers_files
from aecompress.artifact.load import load_compressed
from aecompress.artifact.manifest import WEIGHTS, load_manifest
from aecompress.artifact.save import untouched_state
from aecompress.budget import STORAGE_DTYPES
from aecompress.compressed import CompressedModel
from aecompress.errors import AecompressError
from aecompress.outputs import check_new_folder
from aecompress.tensorfile import write_safetensors


def export_dense(artifact: str | Path, output: str | Path) -> Path:
    """Write the artifact's model as a plain transformers folder: every matrix decoded into
    an fp32 dense weight (safetensors), the base's config and tokenizer. It loads with
    `AutoModel*.from_pretrained(output)` without aecompress; `output` must be new or empty."""
    output = check_new_folder(Path(output))
    intermediate = pruned_intermediate_size(artifact)
    cm = load_compressed(artifact, decode=True)
    model = cm.merge_and_unload()
    if intermediate is not None:  # the MLPs are the smaller ones: say so in the config
        model.config.intermediate_size = intermediate
    with _export_folder(output, cm, Path(artifact)) as work:
        model.save_pretrained(work)
    return output


def pruned_intermediate_size(artifact: str | Path) -> int | None:
    """The one intermediate size of an artifact whose MLPs (`ffn` targets) all keep the
    same number of neurons; None without ffn groups; refused when some layers' MLPs are
    not pruned or keep different numbers (a plain config has one intermediate_size)."""
    manifest = load_manifest(artifact)
    pruned = [e for e in manifest.groups if e.members[0].kind == "ffn"]
    if not pruned:
        return None
    layers = {m.layer for e in pruned for m in e.members}
    widths = {w for e in pruned for w in ([e.width] if isinstance(e.width, int) else e.width)}
    config = json.loads((Path(artifact) / "config.json").read_text())
    if len(widths) > 1 or layers != set(range(config.get("num_hidden_layers", -1))):
        raise AecompressError(
            f"{artifact}: its MLPs keep different numbers of neurons (or some layers are not "
            "pruned), and a plain config has one intermediate_size: compress with --targets "
            "ffn on every layer at one --ratio, without --allocate, for uniform widths"
        )
    return widths.pop()


def export_compressed_tensors(artifact: str | Path, output: str | Path) -> Path:
    """Write a gptq / rtn artifact's model in the compressed-tensors format (see
    compressed_tensors.py): the stored codes, scales and zero points as they are, every
    other tensor in the storage dtype (also the config's `dtype`), the base's config with a
    `quantization_config`. transformers loads it with the compressed-tensors package
    installed. Groups of other methods or layers are refused before any work; `output`
    must be new or empty."""
    output = check_new_folder(Path(output))
    manifest = load_manifest(artifact)
    check_exportable(manifest)
    cm = load_compressed(artifact)
    tensors, _ = untouched_state(cm.model, cm.replaced_paths())  # tied ones once: HF ties them
    for fitted in cm.groups:
        for target, stored in zip(fitted.group.members, fitted.stored.members, strict=True):
            tensors.update(module_tensors(target.path, stored, fitted.shape[1]))
    linear = [name for name, module in cm.model.named_modules() if isinstance(module, nn.Linear)]
    config = json.loads((Path(artifact) / "config.json").read_text())
    config["dtype"] = manifest.storage_dtype
    config["quantization_config"] = quantization_config(manifest.groups, linear)
    with _export_folder(output, cm, Path(artifact)) as work:
        dtype = STORAGE_DTYPES[manifest.storage_dtype]
        write_safetensors(work / WEIGHTS, dict(sorted(tensors.items())), dtype, {"format": "pt"})
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if cm.model.can_generate():
            cm.model.generation_config.save_pretrained(work)
    return output


# the formats `aecompress export --format` writes
EXPORTS: dict[str, Callable[[str | Path, str | Path], Path]] = {
    "dense": export_dense,
    "compressed-tensors": export_compressed_tensors,
}


@contextmanager
def _export_folder(output: Path, cm: CompressedModel, artifact: Path) -> Iterator[Path]:
    """A fresh folder for a format's model files; the base's tokenizer and pooling files
    are added after them, and the folder is renamed into `output` (as `atomic_folder`)."""
    with atomic_folder(output) as work:
        yield work
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(work)
        copy_sentence_transformers_files(artifact, work)
