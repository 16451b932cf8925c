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
from aecompress.outputs import check_new_folder
from aecompress.tensorfile import write_safetensors


def export_dense(artifact: str | Path, output: str | Path) -> Path:
    """Write the artifact's model as a plain transformers folder: every matrix decoded into
    an fp32 dense weight (safetensors), the base's config and tokenizer. It loads with
    `AutoModel*.from_pretrained(output)` without aecompress; `output` must be new or empty."""
    output = check_new_folder(Path(output))
    cm = load_compressed(artifact, decode=True)
    model = cm.merge_and_unload()
    with _export_folder(output, cm, Path(artifact)) as work:
        model.save_pretrained(work)
    return output


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
    tensors, _ = untouched_state(cm)  # tied tensors once: transformers ties them again
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
