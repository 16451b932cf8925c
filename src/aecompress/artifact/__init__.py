"""The artifact: a folder with config, tokenizer, the weights and a JSON manifest.

The weights (model.safetensors, or HF-style shards with their index) hold the untouched
parameters under their usual names and each group's stored tensors under
`aecompress.<group>.<shared|member index>.<name>`. The manifest (a
validated schema: unknown keys, wrong types and forged sizes are refused) says which
method rebuilds each group and how; it is written last, and the folder appears atomically.

manifest.py: the schema and its checks; weights.py: the weights files, written and read
back verified; folder.py: atomic folder writes; save.py, load.py, export.py;
compressed_tensors.py: the compressed-tensors format an export may be written in.
"""

from aecompress.artifact.export import EXPORTS, export_compressed_tensors, export_dense
from aecompress.artifact.load import checked_skeleton, load_compressed
from aecompress.artifact.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PREFIX,
    WEIGHTS,
    GroupEntry,
    Manifest,
    SlicedEntry,
    check_groups,
    is_artifact,
    load_manifest,
    read_manifest,
)
from aecompress.artifact.save import round_to_storage, save_artifact
from aecompress.artifact.weights import weights_header

__all__ = [
    "EXPORTS",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "PREFIX",
    "WEIGHTS",
    "GroupEntry",
    "Manifest",
    "SlicedEntry",
    "check_groups",
    "checked_skeleton",
    "export_compressed_tensors",
    "export_dense",
    "is_artifact",
    "load_compressed",
    "load_manifest",
    "read_manifest",
    "round_to_storage",
    "save_artifact",
    "weights_header",
]
