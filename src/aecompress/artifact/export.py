"""Exporting an artifact's model as a folder that loads without aecompress.

A format is a function that checks its output folder before any work, loads the artifact
and writes its model into the folder `_export_folder` gives, which then receives the base's
tokenizer and a sentence encoder's pooling files and appears atomically."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aecompress.artifact.folder import atomic_folder, copy_sentence_transformers_files
from aecompress.artifact.load import load_compressed
from aecompress.compressed import CompressedModel
from aecompress.outputs import check_new_folder


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


@contextmanager
def _export_folder(output: Path, cm: CompressedModel, artifact: Path) -> Iterator[Path]:
    """A fresh folder for a format's model files; the base's tokenizer and pooling files
    are added after them, and the folder is renamed into `output` (as `atomic_folder`)."""
    with atomic_folder(output) as work:
        yield work
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(work)
        copy_sentence_transformers_files(artifact, work)
