"""Sparse methods: kept weights plus their positions, every stored bit counted.

A sparse method keeps `width` weights of the group (its width) and stores per member the
kept values (row-major order, in the storage dtype) and their positions, in one of:
- `bitmap`: one bit per entry of the matrix, in int32 words: 32 * ceil(n*m/32) bits;
- `int32`: one flat index per kept weight: 32 bits each;
- `N:M` (e.g. 2:4; a method option): N kept in every M consecutive weights of a row, each
  kept weight's place in its group in ceil(log2 M) bits, in int32 words.
`auto` takes whichever of bitmap / int32 is cheaper for the kept count. Methods differ in
which weights they keep and what values they give them (`select`).

With a quantization stage (stage.py) the kept values are stored as codes instead
(`values.codes`: one packed row of each member's kept codes, in their order) on a grid of
the dense matrix's groups (`values.scales` [rows, groups] and, asymmetric, `values.zeros`):
sparsegpt quantizes each kept weight inside its OBS sweep (joint pruning and quantization,
the SparseGPT paper's), the others round the kept values to nearest. Members of a stack
then keep equal counts (their codes are packed per member).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, field_validator

from aecompress.budget import STORAGE_DTYPES
from aecompress.errors import AecompressError
from aecompress.methods.base import (
    FitContext,
    GroupSpec,
    Method,
    MethodLayout,
    MethodOptions,
    Stored,
    Width,
    register,
)
from aecompress.methods.linalg import inverse_cholesky
from aecompress.methods.quantize import Grid, Quantized, code_bits, grid_bits
from aecompress.methods.stage import QuantizedLayout, rebuild_entries, store_quantized

BITS = 32  # positions are packed into int32 words


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor [N] packed little-endian into int32 words [ceil(N/32)] (on the
    tensor's device)."""
    packed = np.packbits(bits.cpu().numpy().astype(np.uint8), bitorder="little")
    packed = np.pad(packed, (0, -packed.size % 4))
    return torch.from_numpy(packed.view("<i4").copy()).to(bits.device)


def unpack_bits(words: torch.Tensor, size: int) -> torch.Tensor:
    """The flat bool tensor [size] packed in `words` by pack_bits (on their device)."""
    raw = words.cpu().numpy().astype("<i4").view(np.uint8)
    unpacked = np.unpackbits(raw, bitorder="little")[:size].astype(bool)
    return torch.from_numpy(unpacked).to(words.device)


def words(bits: int) -> int:
    return -(-bits // BITS)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None, 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    n, _, m = pattern.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ValueError(f"pattern must be 'unstructured' or N:M with 0 < N < M (got '{pattern}')")
    return int(n), int(m)


class SparseOptions(MethodOptions):
    """`index`: how positions are stored (auto: the cheaper of bitmap and int32 for the
    kept count); `pattern`: unstructured, or N:M (N kept in every M weights of a row)."""

    index: Literal["bitmap", "int32", "auto"] = "auto"
    pattern: str = "unstructured"

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


class SparseLayout(MethodLayout):
    """Each member's [rows, cols] and how its positions are stored."""

    shape: tuple[int, int]
    index: Literal["bitmap", "int32", "nm"]
    n_m: tuple[int, int] | None = None


def position_cost(scheme: str, kept: int, spec: GroupSpec, n_m: tuple[int, int] | None) -> int:
    """Bits spent on the positions of `kept` weights of the group under `scheme`."""
    if scheme == "bitmap":
        return BITS * spec.count * words(spec.rows * spec.cols)
    if scheme == "int32":
        return BITS * kept
    assert n_m is not None
    per_member = kept // spec.count
    return BITS * spec.count * words(per_member * math.ceil(math.log2(n_m[1])))


def value_bits(kept: int, spec: GroupSpec) -> int:
    """Bits of the group's `kept` values: floats, or codes on a grid (module docstring)."""
    if spec.quantize is None:
        return spec.floats(kept)
    scheme = spec.quantize.scheme
    codes = sum(code_bits(scheme.bits, k) for k in split_evenly(kept, spec.count))
    return codes + spec.count * grid_bits(scheme, spec.rows, spec.cols, spec.float_bits)


class Kept(NamedTuple):
    """A member's kept weights: `mask` [n, m] bool, `values` [n, m] (read where kept), and
    the grid the kept values already lie on (None: rounded to nearest after selection)."""

    mask: torch.Tensor
    values: torch.Tensor
    grid: Grid | None = None


class SparseMethod(Method):
    """Keeps `width` weights of the group; stores values + positions (module docstring).
    Subclasses choose the kept weights and their values (`select`). Served decoded."""

    Options = SparseOptions
    options: SparseOptions
    Layout = SparseLayout
    quantizable = True

    def schemes(self) -> list[str]:
        if self.options.n_m is not None:
            return ["nm"]
        return ["bitmap", "int32"] if self.options.index == "auto" else [self.options.index]

    def scheme(self, kept: int, spec: GroupSpec) -> str:
        return min(self.schemes(), key=lambda s: position_cost(s, kept, spec, self.options.n_m))

    def check(self, spec: GroupSpec) -> None:
        if spec.rows * spec.cols >= 2**31:
            raise AecompressError(f"{spec.name}: matrices over 2^31 entries cannot be indexed")
        if self.options.n_m is not None and spec.cols % self.options.n_m[1]:
            raise AecompressError(
                f"{spec.name}: {spec.cols} columns do not split into groups of "
                f"{self.options.n_m[1]} ({self.options.pattern})"
            )

    def cost(self, width: Width, spec: GroupSpec) -> int:
        assert isinstance(width, int)
        positions = position_cost(self.scheme(width, spec), width, spec, self.options.n_m)
        return value_bits(width, spec) + positions

    def max_width(self, spec: GroupSpec) -> int:
        if self.options.n_m is not None:
            n, m = self.options.n_m
            return spec.numel * n // m
        return spec.numel

    def solve_width(self, matrices: Sequence[torch.Tensor], context: FitContext) -> Width:
        if self.options.n_m is None:
            return super().solve_width(matrices, context)
        spec, budget = context.spec, context.budget
        kept = self.max_width(spec)  # N:M fixes the kept count
        if self.cost(kept, spec) > budget:
            raise AecompressError(
                f"{spec.name}: the ratio is too large for {self.options.pattern} sparsity, "
                f"which stores {self.cost(kept, spec)} bits against a budget of {int(budget)}"
            )
        return kept

    def larger(self, width: Width, spec: GroupSpec) -> list[Width]:
        return [] if self.options.n_m is not None else super().larger(width, spec)

    @abstractmethod
    def select(
        self, matrices: Sequence[torch.Tensor], kept: int, context: FitContext
    ) -> list[Kept]:
        """The kept weights of each member, `kept` in all (split evenly under a stage)."""

    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        assert isinstance(width, int)
        spec = context.spec
        scheme = self.scheme(width, spec)
        chosen = self.select(matrices, width, context)
        if sum(int(k.mask.sum()) for k in chosen) != width:
            raise RuntimeError(f"{self.name} kept the wrong number of weights for {spec.name}")
        members = [encode_sparse(k.mask, k.values, scheme, self.options.n_m) for k in chosen]
        quantized = None
        if spec.quantize is not None:
            quantized = QuantizedLayout(stage=spec.quantize, cols={"values": spec.cols})
            for member, kept in zip(members, chosen, strict=True):
                del member["values"]
                member |= quantize_kept(kept, spec)
        layout = SparseLayout(
            shape=(spec.rows, spec.cols), index=scheme, n_m=self.options.n_m, quantize=quantized
        )
        info = {
            "density": width / spec.numel,
            "position_bits": position_cost(scheme, width, spec, self.options.n_m),
            "ratio_without_positions": spec.numel / width,
        }
        return Stored({}, members, width, layout, info)

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        assert isinstance(stored.layout, SparseLayout)
        return decode_sparse(stored.members[index], stored.layout)


def encode_sparse(
    mask: torch.Tensor, values: torch.Tensor, scheme: str, n_m: tuple[int, int] | None
) -> dict[str, torch.Tensor]:
    """The kept `values` (where `mask`) and their positions as stored under `scheme`."""
    kept = values.reshape(-1)[mask.reshape(-1)].clone()
    if scheme == "bitmap":
        return {"values": kept, "mask": pack_bits(mask.reshape(-1))}
    if scheme == "int32":
        return {"values": kept, "indices": mask.reshape(-1).nonzero().squeeze(1).int()}
    assert n_m is not None
    places = mask.reshape(-1, n_m[1]).nonzero()[:, 1]  # each kept weight's place in its group
    shifts = torch.arange(math.ceil(math.log2(n_m[1])), device=places.device)
    bits = ((places[:, None] >> shifts) & 1).bool()
    return {"values": kept, "places": pack_bits(bits.reshape(-1))}


def quantize_kept(kept: Kept, spec: GroupSpec) -> dict[str, torch.Tensor]:
    """The kept values' codes (one packed row, row-major order) on their grid (the one
    they lie on, else RTN's on the kept values), as stored under `values.` (module
    docstring)."""
    assert spec.quantize is not None
    scale_dtype = STORAGE_DTYPES[spec.storage_dtype]
    grid = kept.grid or Grid.of(kept.values * kept.mask, spec.quantize.scheme, scale_dtype)
    quantized = grid.quantize(kept.values * kept.mask)
    codes = quantized.codes.reshape(-1)[kept.mask.reshape(-1)][None]
    return store_quantized("values", Quantized(codes, grid.scales, quantized.zeros, grid.scheme))


def decode_sparse(member: dict[str, torch.Tensor], layout: SparseLayout) -> torch.Tensor:
    """The dense [rows, cols] matrix of a member's kept values (differentiable in them, or
    in the scales of their grid when quantized)."""
    rows, cols = layout.shape
    flat = positions(member, layout)
    if layout.quantize is None:
        values = member["values"]
    else:
        scheme = layout.quantize.stage.scheme
        values = rebuild_entries(member, "values", scheme, layout.shape, flat)
    return values.new_zeros(rows * cols).index_put((flat,), values).view(rows, cols)


def positions(member: dict[str, torch.Tensor], layout: SparseLayout) -> torch.Tensor:
    """Flat positions (int64, row-major) of a member's kept values."""
    rows, cols = layout.shape
    if layout.index == "bitmap":
        return unpack_bits(member["mask"], rows * cols).nonzero().squeeze(1)
    if layout.index == "int32":
        return member["indices"].long()
    assert layout.n_m is not None
    n, m = layout.n_m
    kept, width = rows * cols // m * n, math.ceil(math.log2(m))
    bits = unpack_bits(member["places"], kept * width).view(kept, width).long()
    places = (bits << torch.arange(width, device=bits.device)).sum(1)
    return torch.arange(kept, device=bits.device) // n * m + places


def keep_largest(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """A bool mask of the `kept` largest entries of `scores` (any shape)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if kept:
        mask[scores.reshape(-1).topk(kept, sorted=False).indices] = True
    return mask.view(scores.shape)


def keep_largest_per_group(scores: torch.Tensor, n_m: tuple[int, int]) -> torch.Tensor:
    """N:M: a bool mask keeping the N largest scores in every M consecutive entries of a row."""
    n, m = n_m
    groups = scores.reshape(-1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, groups.topk(n, dim=1).indices, True)
    return mask.view(scores.shape)


@register
class MagnitudePruning(SparseMethod):
    """Magnitude pruning: keep the largest |w| of the group (one threshold over a stack of
    layers; N:M per group of M), zero the rest. Minimises ||W - W_hat||_F for the number of
    kept weights. Stores values + positions (module docstring); served decoded."""

    name = "prune"

    def select(
        self, matrices: Sequence[torch.Tensor], kept: int, context: FitContext
    ) -> list[Kept]:
        if self.options.n_m is not None:
            return [Kept(keep_largest_per_group(w.abs(), self.options.n_m), w) for w in matrices]
        if context.spec.quantize is not None:  # equal counts (module docstring)
            counts = split_evenly(kept, len(matrices))
            return [
                Kept(keep_largest(w.abs(), c), w) for w, c in zip(matrices, counts, strict=True)
            ]
        masks = keep_largest(torch.stack(list(matrices)).abs(), kept)
        return [Kept(mask, w) for mask, w in zip(masks.unbind(0), matrices, strict=True)]


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` whole numbers differing by at most one (the first ones larger)."""
    return [total // parts + (index < total % parts) for index in range(parts)]


def keep_largest_per_row(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """A bool mask keeping `kept` entries in all, the largest scores of each row, rows
    keeping as equal counts as possible (the first rows one more)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    order = scores.argsort(dim=1, descending=True)
    for count in sorted(set(split_evenly(kept, scores.shape[0]))):
        rows = torch.tensor(
            [c == count for c in split_evenly(kept, scores.shape[0])], device=scores.device
        )
        mask[rows] = mask[rows].scatter(1, order[rows, :count], True)
    return mask


class CalibratedSparseOptions(SparseOptions):
    """`damp`: added to X^T X's diagonal, relative to its mean (as in SparseGPT)."""

    damp: float = Field(0.01, ge=0)


def input_norms(context: FitContext, index: int) -> torch.Tensor:
    """||x_j|| of each input channel over the calibration tokens: sqrt of X^T X's diagonal."""
    return context.statistic(index, "xtx").diagonal().clamp_min(0).sqrt().float()


class CalibratedSparseMethod(SparseMethod):
    """A sparse method that reads the inputs of each layer (X^T X of calibration text)."""

    options: CalibratedSparseOptions

    def statistics_needed(self) -> set[str]:
        return {"xtx"}

    def check(self, spec: GroupSpec) -> None:
        super().check(spec)
        if spec.kind == "embedding":
            raise AecompressError(
                f"{spec.name}: {self.name} needs a layer's inputs; an embedding has none "
                "(use prune or another method for embed)"
            )


@register
class Wanda(CalibratedSparseMethod):
    """Wanda (Sun et al. 2023): keep the weights of largest |w_ij| * ||x_j|| in each output
    row (rows keep equal counts; N:M per group of M), no update of the kept values.
    Stores values + positions (module docstring); served decoded."""

    name = "wanda"
    Options = CalibratedSparseOptions

    def select(
        self, matrices: Sequence[torch.Tensor], kept: int, context: FitContext
    ) -> list[Kept]:
        chosen = []
        for index, (weight, count) in enumerate(
            zip(matrices, split_evenly(kept, len(matrices)), strict=True)
        ):
            scores = weight.abs() * input_norms(context, index)
            if self.options.n_m is not None:
                mask = keep_largest_per_group(scores, self.options.n_m)
            else:
                mask = keep_largest_per_row(scores, count)
            chosen.append(Kept(mask, weight))
        return chosen


class SparseGPTOptions(CalibratedSparseOptions):
    """`block_size`: columns pruned and updated together (lazy batch updates)."""

    block_size: int = Field(128, ge=1)


def obs_prune(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    kept: int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    n_m: tuple[int, int] | None = None,
    overwrite: bool = False,
    grid: Grid | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's pruning of `weight` [n, m] to `kept` weights under inputs with Gram
    `xtx` [m, m]: column by column, the weights of least w^2 / [U]_jj^2 (U the upper
    Cholesky factor of (X^T X + damp)^-1) are zeroed and the error they make is spread
    onto the columns not yet visited (the optimal brain surgeon update), in blocks of
    columns with lazy updates. Each block prunes its share of the budget (unstructured),
    or M - N of every M weights of a row (N:M). With a `grid`, each kept weight is also
    rounded to its group's nearest grid value as the sweep reaches it, and that error
    spread too (joint pruning and quantization). Returns (kept mask, updated values).
    `overwrite`: `xtx` may be factorised in place (no one reads it after)."""
    rows, cols = weight.shape
    work = weight.detach().clone().float()
    work[:, xtx.diagonal() == 0] = 0  # inputs never seen
    upper = inverse_cholesky(xtx, damp, overwrite)
    pruned_total = rows * cols - kept
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, factor = work[:, start:end].clone(), upper[start:end, start:end].float()
        errors = torch.zeros_like(block)
        diagonal = factor.diagonal()
        if n_m is None:
            share = round(pruned_total * end / cols) - round(pruned_total * start / cols)
            scores = block.pow(2) / diagonal.pow(2)
            chosen = torch.zeros(block.numel(), dtype=torch.bool, device=block.device)
            if share:
                chosen[scores.reshape(-1).topk(share, largest=False).indices] = True
            pruned[:, start:end] = chosen.view_as(block)
        for column in range(end - start):
            if n_m is not None and column % n_m[1] == 0:
                span = slice(column, column + n_m[1])
                scores = block[:, span].pow(2) / diagonal[span].pow(2)
                keep = keep_largest_per_group(scores, n_m)
                pruned[:, start + column : start + column + n_m[1]] = ~keep
            values = block[:, column]
            rounded = values if grid is None else grid.snap(values, start + column)
            quantised = torch.where(pruned[:, start + column], 0.0, rounded)
            error = (values - quantised) / factor[column, column]
            block[:, column:] -= error[:, None] * factor[column, column:][None, :]
            block[:, column] = quantised
            errors[:, column] = error
        work[:, start:end] = block
        work[:, end:] -= errors @ upper[start:end, end:].float()  # float32 rows, as needed
    return ~pruned, work


@register
class SparseGPT(CalibratedSparseMethod):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning that updates the kept weights to
    compensate what it removes, minimising the output error ||(W - W_hat) X^T|| column by
    column (obs_prune). A stack of layers: each member pruned under its own X^T X, the
    kept weights shared equally. Stores values + positions (module docstring); with a
    gptq quantization stage, the kept weights are quantized in the same sweep."""

    name = "sparsegpt"
    Options = SparseGPTOptions
    options: SparseGPTOptions

    def select(
        self, matrices: Sequence[torch.Tensor], kept: int, context: FitContext
    ) -> list[Kept]:
        chosen = []
        for index, (weight, count) in enumerate(
            zip(matrices, split_evenly(kept, len(matrices)), strict=True)
        ):
            grid = joint_grid(weight, context.spec)
            mask, values = obs_prune(
                weight,
                context.statistic(index, "xtx"),
                count,
                damp=self.options.damp,
                block_size=self.options.block_size,
                n_m=self.options.n_m,
                overwrite=context.owns_statistics,
                grid=grid,
            )
            chosen.append(Kept(mask, values, grid))
        return chosen


def joint_grid(weight: torch.Tensor, spec: GroupSpec) -> Grid | None:
    """The grid of a joint OBS sweep (obs_prune) under the group's stage: RTN's on the
    dense weight for a gptq stage; None without a stage or for an rtn one (the kept
    values are then rounded after pruning)."""
    stage = spec.quantize
    if stage is None or stage.method != "gptq":
        return None
    return Grid.of(weight, stage.scheme, STORAGE_DTYPES[spec.storage_dtype])
