"""Quantization as a stage of a method: the method's matrix-shaped stored tensors (factors,
kept values, codes) are stored as integer codes on a grid (quantize.py) instead of floats,
within the same bit budget, so that its width solver finds the larger width that fits.

A quantized matrix NAME is stored as `NAME.codes` (int32 words, `pack`), `NAME.scales`
[rows, groups] (storage dtype) and, asymmetric only, `NAME.zeros` (packed along the rows),
compressed-tensors' pack-quantized layout; it is rebuilt differentiably in the scales, so
block refinement trains the scales with the codes fixed. Vectors (norms, biases) stay floats.

A method supports the stage by setting `quantizable = True` and, when `spec.quantize` is set:
counting its matrices with `spec.matrix_bits`, storing them with `store_quantized` (codes
chosen by `quantize_matrix`: GPTQ on the matrix's input statistics, or RTN), recording the
stage in its layout (`MethodLayout.quantize`, with each quantized matrix's column count),
and rebuilding them with `rebuild_quantized`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from aecompress.methods.quantize import Quantized, QuantScheme, gptq, pack, rtn
from aecompress.modules import dequantize_packed, unpack, zero_points

STAGE_METHODS = ("gptq", "rtn")


class GPTQSettings(BaseModel):
    """GPTQ's `damp` (ridge, times the mean diagonal of X^T X), `block` (columns per lazy
    update) and `act_order` (columns visited by decreasing input energy): options of the
    gptq method and of a gptq quantization stage, one definition for both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    damp: float = Field(0.01, ge=0)
    block: int = Field(128, ge=1)
    act_order: bool = True

    @property
    def gptq_settings(self) -> dict[str, Any]:
        """The keywords of quantize.gptq these settings give."""
        return {name: getattr(self, name) for name in GPTQSettings.model_fields}


class QuantStage(GPTQSettings):
    """`bits` per code (2..8); `group` consecutive columns of a row share a scale (None:
    the whole row); `symmetric`: no zero points stored; `method`: codes chosen by GPTQ
    (compensating each rounding on the columns not yet visited, where the method has its
    matrix's input statistics; RTN otherwise) or by round to nearest; a gptq stage's
    GPTQSettings as the gptq method's. Written `int4:g64`, `int3:row`, `int4:g64:rtn`,
    `int4:g128:asym`, `int3:g64:damp=0.1:act_order=false`."""

    bits: int = Field(ge=2, le=8)
    group: int | None = Field(64, ge=1)
    symmetric: bool = True
    method: Literal["gptq", "rtn"] = "gptq"

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        return parse_stage(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _settings_for_gptq(self) -> QuantStage:
        if self.method == "rtn" and self.custom_gptq_settings:
            raise ValueError(f"{', '.join(self.custom_gptq_settings)}: GPTQ settings, not rtn's")
        return self

    @property
    def custom_gptq_settings(self) -> dict[str, Any]:
        """The GPTQ settings that differ from their defaults."""
        return {
            name: value
            for name, value in self.gptq_settings.items()
            if value != GPTQSettings.model_fields[name].default
        }

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group, self.symmetric)

    def __str__(self) -> str:
        group = "row" if self.group is None else f"g{self.group}"
        settings = "".join(
            f":{name}={str(value).lower()}" for name, value in self.custom_gptq_settings.items()
        )
        asym = "" if self.symmetric else ":asym"
        return f"int{self.bits}:{group}:{self.method}{asym}{settings}"


def parse_stage(text: str) -> dict[str, Any]:
    """'int4:g64' -> {'bits': 4, 'group': 64}; also ':row', ':rtn' / ':gptq', ':asym',
    and GPTQ settings as ':damp=0.1', ':act_order=false', ':block=64'."""
    head, *parts = text.strip().split(":")
    if not (head.startswith("int") and head[3:].isdigit()):
        raise ValueError(f"'{text}' is not a quantization like int4:g64, int3:row or int4:g64:rtn")
    fields: dict[str, Any] = {"bits": int(head[3:])}
    for part in parts:
        name, equals, value = part.partition("=")
        if equals and name in GPTQSettings.model_fields:
            fields[name] = value
        elif part == "row":
            fields["group"] = None
        elif part[:1] == "g" and part[1:].isdigit():
            fields["group"] = int(part[1:])
        elif part in STAGE_METHODS:
            fields["method"] = part
        elif part in ("sym", "asym"):
            fields["symmetric"] = part == "sym"
        else:
            settings = ", ".join(f"{n}=" for n in GPTQSettings.model_fields)
            raise ValueError(f"'{part}' in '{text}': use gN, row, gptq, rtn, sym, asym, {settings}")
    return fields


class QuantizedLayout(BaseModel):
    """How a group's matrices were quantized: the stage, and the column count of each
    quantized matrix by its stored name (what rebuilding it needs beyond its tensors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: QuantStage
    cols: dict[str, int]


def quantize_matrix(
    matrix: torch.Tensor,
    stage: QuantStage,
    xtx: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> Quantized:
    """`matrix` [out, in] quantized as `stage` says: GPTQ under inputs of Gram `xtx`
    [in, in] (stage method gptq and statistics given), else round to nearest."""
    if stage.method == "gptq" and xtx is not None:
        return gptq(
            matrix.float(), xtx, stage.scheme, **stage.gptq_settings, scale_dtype=scale_dtype
        )
    return rtn(matrix.float(), stage.scheme, scale_dtype=scale_dtype)


def _key(name: str, part: str) -> str:
    return f"{name}.{part}" if name else part


def store_quantized(name: str, quantized: Quantized) -> dict[str, torch.Tensor]:
    """The stored tensors of a quantized matrix `name` ('' for unprefixed names): packed
    codes, scales and (asymmetric) packed zero points (module docstring)."""
    bits = quantized.scheme.bits
    tensors = {
        _key(name, "codes"): pack(quantized.codes, bits),
        _key(name, "scales"): quantized.scales,
    }
    if not quantized.scheme.symmetric:
        tensors[_key(name, "zeros")] = pack(quantized.zeros.T, bits).T.contiguous()
    return tensors


def rebuild_quantized(
    tensors: dict[str, torch.Tensor], name: str, scheme: QuantScheme, cols: int
) -> torch.Tensor:
    """The matrix [rows, cols] that `store_quantized` stored as `name` (differentiable in
    its scales)."""
    scales = tensors[_key(name, "scales")]
    rows, groups = scales.shape
    points = zero_points(tensors.get(_key(name, "zeros")), scheme.bits, rows, groups, scales.device)
    codes = tensors[_key(name, "codes")]
    return dequantize_packed(codes, scales, points, scheme.bits, cols, scheme.group_size(cols))


def stored_matrix(
    tensors: dict[str, torch.Tensor], name: str, quantized: QuantizedLayout | None
) -> torch.Tensor:
    """Matrix `name` of a method's stored tensors: rebuilt from its codes when the group's
    stage quantized it (`quantized`: its layout's record, which names each quantized
    matrix), else the float tensor itself."""
    if quantized is None or name not in quantized.cols:
        return tensors[name]
    return rebuild_quantized(tensors, name, quantized.stage.scheme, quantized.cols[name])


def rebuild_entries(
    tensors: dict[str, torch.Tensor],
    name: str,
    scheme: QuantScheme,
    shape: tuple[int, int],
    flat: torch.Tensor,
) -> torch.Tensor:
    """The values [len(flat)] of the entries at flat (row-major) positions `flat` of a
    [rows, cols] matrix whose codes were stored for those entries only, in their order
    (one packed row), on the matrix's grid (`name`.scales / .zeros [rows, groups]):
    a sparse matrix's kept values (differentiable in the scales)."""
    scales = tensors[_key(name, "scales")]
    rows, cols = shape
    points = zero_points(
        tensors.get(_key(name, "zeros")), scheme.bits, rows, scales.shape[1], scales.device
    )
    codes = unpack(tensors[_key(name, "codes")], scheme.bits, flat.numel())[0]
    row, group = flat // cols, flat % cols // scheme.group_size(cols)
    return (codes.to(scales.dtype) - points[row, group].to(scales.dtype)) * scales[row, group]
