"""The compressed-tensors format (version 0.20.1, `pack-quantized`) as llm-compressor writes
it, built without the compressed-tensors package: a safetensors file and config.json's
`quantization_config`.

A quantized Linear `M` is stored as `M.weight_packed` (int32 [out, ceil(in * bits / 32)]),
`M.weight_scale` ([out, groups], the model's dtype), `M.weight_zero_point` (asymmetric
only: int32 [ceil(out * bits / 32), groups], packed along the rows) and `M.weight_shape`
(int64 [out, in]); gptq and rtn store exactly these tensors (methods/quantize.py), so
they are copied as they are. The config has one group per distinct weight scheme (targets
`Linear` when there is a single one, as llm-compressor writes a one-scheme recipe; the
modules' names otherwise) and lists every other Linear module in `ignore`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from aecompress.artifact.manifest import GroupEntry, Manifest
from aecompress.errors import AecompressError
from aecompress.methods.gptq import QuantLayout

VERSION = "0.20.1"  # the compressed-tensors version whose format is written
PACKED = "pack-quantized"
EXPORTABLE = ("gptq", "rtn")
_SHOWN = 4  # refused groups named in the error


def check_exportable(manifest: Manifest) -> None:
    """Refuse, in one line naming them, groups without a compressed-tensors form: any
    method but gptq / rtn, and members that are not whole Linear matrices (embeddings,
    GPT-2's Conv1D, a part of a fused matrix)."""
    if not manifest.groups:
        raise AecompressError(
            "compressed-tensors holds quantized Linear layers, and this artifact has none (a "
            "sliced model is plain): export it with --dense"
        )
    refused = [f"{entry.name} ({why})" for entry in manifest.groups if (why := _refusal(entry))]
    if refused:
        more = ", ..." if len(refused) > _SHOWN else ""
        raise AecompressError(
            f"compressed-tensors holds only {' / '.join(EXPORTABLE)} groups of Linear layers, "
            f"not {', '.join(refused[:_SHOWN])}{more}: export this artifact with --dense"
        )


def _refusal(entry: GroupEntry) -> str | None:
    if entry.method not in EXPORTABLE:
        return entry.method
    if strange := sorted({m.kind for m in entry.members} - {"linear"}):
        return f"{entry.method} on {' and '.join(strange)} layers"
    if any(m.part is not None for m in entry.members):
        return f"{entry.method} on parts of a fused matrix"
    return None


def weights_args(entry: GroupEntry) -> dict[str, Any]:
    """The `weights` quantization arguments of a gptq / rtn group: `group` strategy with
    its group size, or `channel` (one scale per row); GPTQ's act-order is compressed-
    tensors' `static` ordering (columns visited by input energy, groups kept contiguous)."""
    layout = QuantLayout.model_validate(entry.layout)
    args: dict[str, Any] = {
        "dynamic": False,
        "group_size": layout.group,
        "num_bits": layout.bits,
        "strategy": "group" if layout.group else "channel",
        "symmetric": layout.symmetric,
        "type": "int",
    }
    if entry.method == "gptq" and entry.options.get("act_order"):
        args["actorder"] = "static"
    return args


def quantization_config(groups: Iterable[GroupEntry], linear: Iterable[str]) -> dict[str, Any]:
    """config.json's `quantization_config` for these (exportable) groups of a model whose
    Linear modules are named `linear`."""
    schemes: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    for entry in groups:
        key = tuple(sorted(weights_args(entry).items()))
        schemes.setdefault(key, []).extend(member.path for member in entry.members)
    quantized = {path for paths in schemes.values() for path in paths}
    return {
        "config_groups": {
            f"group_{index}": {
                "format": PACKED,
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"] if len(schemes) == 1 else paths,
                "weights": dict(key),
            }
            for index, (key, paths) in enumerate(schemes.items())
        },
        "format": PACKED,
        "global_compression_ratio": None,
        "ignore": [name for name in linear if name not in quantized],
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": VERSION,
    }


def module_tensors(
    path: str, stored: dict[str, torch.Tensor], cols: int
) -> dict[str, torch.Tensor]:
    """The tensors of the Linear module at `path` from its gptq / rtn stored member
    (`codes`, `scales`, `zeros` when asymmetric) of a matrix with `cols` columns."""
    rows = stored["scales"].shape[0]
    tensors = {
        f"{path}.weight_packed": stored["codes"],
        f"{path}.weight_scale": stored["scales"],
        f"{path}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if "zeros" in stored:
        tensors[f"{path}.weight_zero_point"] = stored["zeros"]
    return tensors
