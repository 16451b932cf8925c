"""aecompress: offline compression of pretrained transformer language models.

cm = aecompress.compress("minilm-l6", method="svd", ratio=10, targets=["embed"])
cm.save_pretrained("out/")
aecompress.compress_to_folder("llama/", "out/", method="sparsegpt", ratio=1.25, targets=["up"])
model = aecompress.load("out/")
aecompress.export_dense("out/", "plain/")  # a plain transformers folder, every matrix decoded
aecompress.export_compressed_tensors("out/", "ct/")  # gptq / rtn packed, as llm-compressor

Names are imported on first use (PEP 562), so that `import aecompress` and the command
line's `--help` do not wait for torch and transformers.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aecompress.errors import AecompressError
from aecompress.version import __version__

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from aecompress.artifact import export_compressed_tensors, export_dense, load_compressed
    from aecompress.compressed import CompressedModel
    from aecompress.engine import compress
    from aecompress.evaluation.runner import evaluate
    from aecompress.models import load_model
    from aecompress.recipe import Recipe
    from aecompress.streamed import compress_to_folder

# public name -> the module defining it
_LAZY = {
    "CompressedModel": "aecompress.compressed",
    "Recipe": "aecompress.recipe",
    "compress": "aecompress.engine",
    "compress_to_folder": "aecompress.streamed",
    "evaluate": "aecompress.evaluation.runner",
    "export_compressed_tensors": "aecompress.artifact",
    "export_dense": "aecompress.artifact",
    "load_compressed": "aecompress.artifact",
    "load_model": "aecompress.models",
}

__all__ = [
    "AecompressError",
    "CompressedModel",
    "Recipe",
    "__version__",
    "compress",
    "compress_to_folder",
    "evaluate",
    "export_compressed_tensors",
    "export_dense",
    "load",
    "load_compressed",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'aecompress' has no attribute '{name}'")
    importlib.import_module("aecompress.artifact")  # registers CompressedModel's writer
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load(path: str | Path, decode: bool = False, lazy: bool | None = None) -> PreTrainedModel:
    """A working transformers model rebuilt from an artifact folder (`decode`: every
    matrix decoded once into a dense weight; `lazy`: sparse matrices kept stored and
    decoded on each call, by default when decoded they would not fit in memory)."""
    from aecompress.artifact import load_compressed

    return load_compressed(path, decode=decode, lazy=lazy).model
