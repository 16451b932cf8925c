"""aecompress: offline compression of pretrained transformer language models.

cm = aecompress.compress("minilm-l6", method="svd", ratio=10, targets=["embed"])
cm.save_pretrained("out/")
model = aecompress.load("out/")
aecompress.export_dense("out/", "plain/")  # a plain transformers folder, every matrix decoded
aecompress.export_compressed_tensors("out/", "ct/")  # gptq / rtn packed, as llm-compressor
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from aecompress.artifact import export_compressed_tensors, export_dense, load_compressed
from aecompress.compressed import CompressedModel
from aecompress.engine import compress
from aecompress.errors import AecompressError
from aecompress.evaluation.runner import evaluate
from aecompress.models import load_model
from aecompress.recipe import Recipe
from aecompress.version import __version__

__all__ = [
    "AecompressError",
    "CompressedModel",
    "Recipe",
    "__version__",
    "compress",
    "evaluate",
    "export_compressed_tensors",
    "export_dense",
    "load",
    "load_compressed",
    "load_model",
]


def load(path: str | Path, decode: bool = False) -> PreTrainedModel:
    """A working transformers model rebuilt from an artifact folder."""
    return load_compressed(path, decode=decode).model
