"""Weight-only integer quantization: round to nearest (RTN) and GPTQ, stored as
compressed-tensors' `pack-quantized` format stores a `group` (or `channel`) strategy.

A weight [out, in] is cut into groups of `group` consecutive columns of a row (the whole row
when `group` is None; a shorter last group when `group` does not divide the columns, which
compressed-tensors' form refuses: `QuantScheme.check_divides`). A group stores a scale and
a zero point; each weight a code in 0..2^bits-1, read back as (code - zero) * scale. The
conventions are those of compressed-tensors 0.20.1 (`calculate_qparams`, `quantize`),
written unsigned: a signed code c in [-2^(b-1), 2^(b-1) - 1] is stored as c + 2^(b-1), as
its `pack_to_int32` does.
- The range of a group always holds 0: lo = min(min w, 0), hi = max(max w, 0).
- symmetric: scale = max(-lo, hi) / ((2^b - 1) / 2), zero = 2^(b-1) (signed 0; the largest
  positive weight is clamped to code 2^b - 1, half a step below it).
- asymmetric: scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale).
- An all-zero group: scale = the machine epsilon of the scale dtype, zero = 2^(b-1) (in
  compressed-tensors the NaN of 0 / 0 cast to int8: 0 on x86), codes 2^(b-1).
- signed code = round(clamp(w / scale + signed zero, -2^(b-1), 2^(b-1) - 1)), ties to even.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aecompress.errors import AecompressError
from aecompress.methods.linalg import inverse_cholesky

WORD = 32  # codes and zero points are packed into int32 words


@dataclass(frozen=True)
class QuantScheme:
    """`bits` per weight (2..8); `group` consecutive columns of a row share a scale and a
    zero point (None: the whole row); `symmetric`: the zero point is fixed at 2^(bits-1)
    (not stored)."""

    bits: int
    group: int | None
    symmetric: bool

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise AecompressError(f"quantization bits must be an integer 2..8, not {self.bits!r}")
        if self.group is not None and (
            isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1
        ):
            raise AecompressError(
                f"quantization group must be a positive integer or None, not {self.group!r}"
            )

    def groups(self, cols: int) -> int:
        """Groups per row of a matrix with `cols` columns (the last one shorter when the
        group does not divide them)."""
        return 1 if self.group is None else -(-cols // self.group)

    def group_size(self, cols: int) -> int:
        """Columns per group (all of them for one group per row)."""
        return cols if self.group is None else self.group

    def check_divides(self, cols: int) -> None:
        """Refuse a group that does not divide `cols` (compressed-tensors' `group` strategy
        needs equal groups; a method that stores its own form may have a shorter last one)."""
        if self.group is not None and cols % self.group:
            raise AecompressError(
                f"quantization group {self.group} does not divide the {cols} columns: "
                f"{_nearest_divisors(cols, self.group)} would (or no group: one per row)"
            )


def _nearest_divisors(cols: int, group: int) -> str:
    """The divisors of `cols` nearest `group` below and above, e.g. '96 or 144'."""
    divisors = [d for d in range(1, cols + 1) if cols % d == 0]
    below = max(d for d in divisors if d < group)
    above = [d for d in divisors if d > group]
    return f"{below} or {above[0]}" if above else str(below)


@dataclass(frozen=True)
class Quantized:
    """A quantized weight: `codes` [out, in] uint8 in 0..2^bits-1, `scales` [out, groups]
    float32, `zeros` [out, groups] uint8 (2^(bits-1) for a symmetric scheme)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    scheme: QuantScheme

    def stored_bits(self, scale_bits: int) -> int:
        """Bits of this weight as compressed-tensors stores it (see `stored_bits`)."""
        rows, cols = self.codes.shape
        return stored_bits(self.scheme, rows, cols, scale_bits)


def dequantize(quantized: Quantized) -> torch.Tensor:
    """The float32 weight [out, in]: (code - zero) * scale of each weight's group."""
    cols, scheme = quantized.codes.shape[1], quantized.scheme
    zeros = per_column(quantized.zeros.float(), scheme, cols)
    return (quantized.codes.float() - zeros) * per_column(quantized.scales, scheme, cols)


def per_column(params: torch.Tensor, scheme: QuantScheme, cols: int) -> torch.Tensor:
    """Group parameters [rows, groups] repeated over each group's columns: [rows, cols]."""
    return params.repeat_interleave(scheme.group_size(cols), dim=1)[:, :cols]


@dataclass(frozen=True)
class Grid:
    """The values a weight may take: each group's scale and signed zero point [out, groups]
    (float32) under `scheme`, fixed before any code is chosen (static groups)."""

    scheme: QuantScheme
    scales: torch.Tensor
    zeros: torch.Tensor

    @classmethod
    def of(
        cls, weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype = torch.float32
    ) -> Grid:
        """The grid RTN puts on `weight` (module docstring)."""
        return cls(scheme, *_qparams(weight.detach().float(), scheme, scale_dtype))

    def snap(self, values: torch.Tensor, column: int) -> torch.Tensor:
        """Column `column`'s `values` [out] rounded to their groups' nearest grid value."""
        group = 0 if self.scheme.group is None else column // self.scheme.group
        scale, zero = self.scales[:, group], self.zeros[:, group]
        return (_round(values, scale, zero, self.scheme.bits) - zero) * scale

    def quantize(self, weight: torch.Tensor) -> Quantized:
        """Each weight's nearest code on this grid (exact for a weight on it)."""
        cols, scheme = weight.shape[1], self.scheme
        scales, zeros = per_column(self.scales, scheme, cols), per_column(self.zeros, scheme, cols)
        codes = _round(weight.detach().float(), scales, zeros, scheme.bits)
        return _package(codes, self.scales, self.zeros, scheme)


def rtn(
    weight: torch.Tensor, scheme: QuantScheme, *, scale_dtype: torch.dtype = torch.float32
) -> Quantized:
    """Round to nearest: each weight's nearest code under its group's min/max (asymmetric)
    or absmax (symmetric) scale (module docstring). `scale_dtype`: the dtype the scales
    are stored in; they are rounded to it before the codes are chosen."""
    _check(weight)
    return Grid.of(weight, scheme, scale_dtype).quantize(weight)


def gptq(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
    scale_dtype: torch.dtype = torch.float32,
) -> Quantized:
    """GPTQ (Frantar et al. 2022): codes lowering the output error ||(W - W_hat) X^T||_F
    greedily, column by column, under inputs with Gram `xtx` = X^T X [in, in] (not
    modified): a column is rounded and its error (w - q) / U_jj, times row j of U (upper,
    U^T U = (X^T X + damp * mean diag I)^-1, float64), taken off the columns not yet
    visited, in blocks of `block` columns with lazy updates (float32). Columns of inputs
    never seen (zero diagonal) are zeroed first. The scales and zeros are then fixed, as
    RTN sets them, before the sweep (GPTQ's static groups; llm-compressor's qparams come
    from its observer before the sweep too), so `act_order` (columns visited by
    decreasing diag X^T X) keeps contiguous groups: nothing stores the order."""
    _, cols = _check(weight)
    if xtx.shape != (cols, cols):
        raise AecompressError(f"X^T X is {tuple(xtx.shape)}, the weight has {cols} columns")
    work = weight.detach().float().clone()
    work[:, xtx.diagonal() == 0] = 0
    scales, zeros = _qparams(work, scheme, scale_dtype)
    if act_order:
        order = torch.argsort(xtx.diagonal(), descending=True)
        upper = inverse_cholesky(xtx.double()[order][:, order], damp, overwrite=True)
        work = work[:, order]
    else:
        order = torch.arange(cols, device=weight.device)
        upper = inverse_cholesky(xtx, damp)
    group_of = order // scheme.group_size(cols)
    visited = _sweep(work, upper, scales, zeros, group_of, scheme.bits, block)
    codes = torch.empty_like(visited)
    codes[:, order] = visited
    return _package(codes, scales, zeros, scheme)


def _sweep(
    work: torch.Tensor,
    upper: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_of: torch.Tensor,
    bits: int,
    block: int,
) -> torch.Tensor:
    """Signed codes [out, in] of GPTQ's sweep (see gptq) over the columns of `work`
    (float32), column j in group `group_of[j]`, `upper` the factor U of the columns in
    that order. It runs on the transpose: a column is a contiguous row."""
    cols = work.shape[1]
    transposed = work.T.contiguous()
    codes = torch.empty_like(transposed)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        chunk, factor = transposed[start:end], upper[start:end, start:end].float()
        scale, zero = scales.T[group_of[start:end]], zeros.T[group_of[start:end]]
        errors = torch.empty_like(chunk)
        for column in range(end - start):
            values, code = chunk[column], codes[start + column]
            torch.round(_scaled(values, scale[column], zero[column], bits), out=code)
            rounded = (code - zero[column]).mul_(scale[column])
            torch.div(values.sub(rounded), factor[column, column], out=errors[column])
            chunk[column + 1 :].addr_(factor[column, column + 1 :], errors[column], alpha=-1)
        transposed[end:].addmm_(upper[start:end, end:].T.float(), errors, alpha=-1)
    return codes.T


def _check(weight: torch.Tensor) -> tuple[int, int]:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise AecompressError(
            f"quantization needs a float matrix, not {weight.dtype} {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    return rows, cols


def _qparams(
    weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (float32 values of `scale_dtype`) and signed zero points (float32 integers,
    from the scales before their rounding to `scale_dtype`, as compressed-tensors),
    [out, groups], of `weight` (float32) under `scheme` (module docstring)."""
    rows, cols = weight.shape
    groups, size = scheme.groups(cols), scheme.group_size(cols)
    grouped = F.pad(weight, (0, groups * size - cols)).view(rows, groups, size)  # 0: neutral
    low, high = grouped.amin(dim=2).clamp_max(0), grouped.amax(dim=2).clamp_min(0)
    steps = 2**scheme.bits - 1
    if scheme.symmetric:
        scales = torch.maximum(-low, high) / (steps / 2)
        zeros = torch.zeros_like(scales)
    else:
        scales = (high - low) / steps
        lowest, highest = _signed_range(scheme.bits)
        zeros = (lowest - low / scales).clamp(lowest, highest).round()
        zeros[scales == 0] = 0
    scales = scales.to(scale_dtype).float()
    scales[scales == 0] = torch.finfo(scale_dtype).eps
    return scales, zeros


def _signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _round(
    values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """Signed codes (float32 integers) of `values` under (broadcast) scales and zeros."""
    return _scaled(values, scales, zeros, bits).round_()


def _scaled(
    values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """values / scales + zeros clamped to the signed range (the codes before rounding)."""
    lowest, highest = _signed_range(bits)
    return (values / scales + zeros).clamp_(lowest, highest)


def _package(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: QuantScheme
) -> Quantized:
    """Signed codes and zeros shifted by 2^(bits-1) into uint8."""
    offset = 2 ** (scheme.bits - 1)
    return Quantized(
        (codes + offset).to(torch.uint8), scales, (zeros + offset).to(torch.uint8), scheme
    )


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [rows, cols] (0..2^bits-1) packed as compressed-tensors 0.20.1's
    `pack_to_int32` packs signed codes: each row a stream of bits, code j at bits
    j*bits.. (least significant first), cut into little-endian int32 words; a code may
    straddle two words (dense since compressed-tensors 0.18; before, floor(32 / bits)
    codes per word, the same for 2, 4 and 8 bits). Returns int32 [rows,
    ceil(cols * bits / 32)] (on the codes' device). compressed-tensors packs the zero
    points [out, groups] of an asymmetric scheme along the rows: pack(zeros.T, bits).T.
    aecompress.modules.unpack reads either back."""
    rows, cols = codes.shape
    digits = np.unpackbits(
        codes.cpu().numpy().astype(np.uint8)[..., None], axis=2, count=bits, bitorder="little"
    )
    stream = np.zeros((rows, math.ceil(cols * bits / WORD) * WORD), dtype=np.uint8)
    stream[:, : cols * bits] = digits.reshape(rows, cols * bits)
    words = np.packbits(stream, axis=1, bitorder="little").view("<i4")
    return torch.from_numpy(words.astype(np.int32)).to(codes.device)


def stored_bits(scheme: QuantScheme, rows: int, cols: int, scale_bits: int) -> int:
    """Bits of a [rows, cols] weight in compressed-tensors' `pack-quantized` form:
    `weight_packed` (the codes, `pack`: rows * ceil(cols * bits / 32) int32 words) and
    its grid (`grid_bits`). The shape compressed-tensors also writes (`weight_shape`, two
    integers) is not counted."""
    return rows * code_bits(scheme.bits, cols) + grid_bits(scheme, rows, cols, scale_bits)


def code_bits(bits: int, count: int) -> int:
    """Bits of `count` codes packed into one row of int32 words (`pack`)."""
    return math.ceil(count * bits / WORD) * WORD


def grid_bits(scheme: QuantScheme, rows: int, cols: int, scale_bits: int) -> int:
    """Bits of the grid of a [rows, cols] weight: `weight_scale` (rows * groups scales of
    `scale_bits` each) and, asymmetric only, `weight_zero_point` (packed along the rows:
    ceil(rows * bits / 32) * groups words)."""
    groups = scheme.groups(cols)
    zeros = 0 if scheme.symmetric else code_bits(scheme.bits, rows) * groups
    return rows * groups * scale_bits + zeros


def bits_per_weight(scheme: QuantScheme, rows: int, cols: int, scale_bits: int) -> float:
    """Stored bits (`stored_bits`) per weight of a [rows, cols] matrix."""
    return stored_bits(scheme, rows, cols, scale_bits) / (rows * cols)
