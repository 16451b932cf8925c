"""Tucker decomposition of a group's stacked matrices, reshaped per head, refined by the AE loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import tensorly as tl
import torch
from pydantic import Field
from tensorly.decomposition import tucker

from aecompress.errors import AecompressError
from aecompress.methods.base import (
    FitContext,
    GroupSpec,
    Method,
    MethodLayout,
    Stored,
    Width,
    register,
)
from aecompress.methods.losses import RefineOptions, refine_factors

ATTENTION_ROWS = ("q", "k", "v")  # [heads * head_dim, in]: heads split the rows
ATTENTION_COLS = ("o",)  # [hidden, heads * head_dim]: heads split the columns


def tensor_dims(
    count: int, rows: int, cols: int, heads: str, head_dim: int, group: str
) -> list[int]:
    """Shape of the group's tensor: [layers, heads, head_dim, in] (heads on rows),
    [layers, out, heads, head_dim] (on columns) or [layers, out, in]; one layer: no mode."""
    if heads == "rows":
        if rows % head_dim:
            raise AecompressError(f"{group}: {rows} rows do not split into heads of {head_dim}")
        dims = [rows // head_dim, head_dim, cols]
    elif heads == "cols":
        if cols % head_dim:
            raise AecompressError(f"{group}: {cols} columns do not split into heads of {head_dim}")
        dims = [rows, cols // head_dim, head_dim]
    else:
        dims = [rows, cols]
    return ([count] if count > 1 else []) + dims


def tucker_cost(dims: Sequence[int], ranks: Sequence[int]) -> int:
    """Stored numbers: the core (prod of ranks) and one factor [dim, rank] per mode."""
    return math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks, strict=True))


def mode_spectra(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Squared singular values of each mode's unfolding, descending (float64)."""
    spectra = []
    for mode in range(tensor.dim()):
        unfolding = tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1).double()
        gram = (
            unfolding @ unfolding.T
            if unfolding.shape[0] <= unfolding.shape[1]
            else (unfolding.T @ unfolding)
        )
        values = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
        spectra.append(torch.cat([values, values.new_zeros(tensor.shape[mode])]))
    return spectra


def _step(ranks: Sequence[int], mode: int, step: int) -> list[int]:
    return [r + step if j == mode else r for j, r in enumerate(ranks)]


def _valid(dims: Sequence[int], ranks: Sequence[int]) -> bool:
    """Ranks within the dims, and no mode wider than the product of the others."""
    total = math.prod(ranks)
    return all(1 <= r <= d and r * r <= total for d, r in zip(dims, ranks, strict=True))


def tucker_ranks(
    dims: Sequence[int], spectra: Sequence[torch.Tensor], budget: float, group: str
) -> list[int]:
    """Ranks within the budget, greedily: from full ranks, drop the component with the least
    energy (squared singular value of its unfolding) per number saved until the cost fits,
    then add back the best components that still fit, so that no single rank can grow.
    A mode wider than the product of the others is narrowed first (two modes: equal ranks,
    an SVD)."""
    ranks = list(dims)
    while tucker_cost(dims, ranks) > budget or not _valid(dims, ranks):
        cost = tucker_cost(dims, ranks)
        too_wide = [j for j, r in enumerate(ranks) if r * r > math.prod(ranks)]
        prices = {
            j: spectra[j][ranks[j] - 1].item()
            / max(cost - tucker_cost(dims, _step(ranks, j, -1)), 1)
            for j in (too_wide or range(len(dims)))
            if ranks[j] > 1
        }
        if not prices:
            raise AecompressError(
                f"{group}: the ratio is too large, even Tucker ranks of 1 store "
                f"{cost} numbers against a budget of {int(budget)}"
            )
        ranks = _step(ranks, min(prices, key=prices.__getitem__), -1)
    while True:
        cost = tucker_cost(dims, ranks)
        gains = {
            j: spectra[j][ranks[j]].item() / max(tucker_cost(dims, _step(ranks, j, 1)) - cost, 1)
            for j in range(len(dims))
            if _valid(dims, _step(ranks, j, 1)) and tucker_cost(dims, _step(ranks, j, 1)) <= budget
        }
        if not gains:
            return ranks
        ranks = _step(ranks, max(gains, key=gains.__getitem__), 1)


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """core x_1 U_1 x_2 U_2 ... (the full tensor, differentiable)."""
    tensor = core
    for mode, factor in enumerate(factors):
        tensor = torch.tensordot(factor, tensor, dims=([1], [mode])).movedim(0, mode)
    return tensor


class TuckerOptions(RefineOptions):
    """`heads`: how rows/columns split into heads (auto: q, k, v by rows, o by columns,
    other families not at all); `head_dim`: head size (default: the model's);
    `iterations`: HOOI iterations of tensorly's tucker."""

    heads: Literal["auto", "rows", "cols", "none"] = "auto"
    head_dim: int | None = Field(None, ge=1)
    iterations: int = Field(10, ge=1)


class TuckerLayout(MethodLayout):
    """The tensor's dims (see tensor_dims), the member count (a layer mode when > 1) and
    each member's shape."""

    dims: list[int]
    layers: int
    shape: tuple[int, int]  # of each member, [rows, cols]


@register
class Tucker(Method):
    """Tucker decomposition of the group's stacked matrices as one tensor: [layers, heads,
    head_dim, in] for attention q/k/v, [layers, out, heads, head_dim] for o, [layers, out,
    in] otherwise (no layer mode for a single matrix).

    Stores the core and one factor per mode (all shared by the group); the width is the
    ranks, chosen greedily by the modes' singular values within the budget (core + factors
    counted). Initialised by HOOI (tensorly), refined by the paper's AE loss over the rows
    with Adam, keeping the best. Served as a decoded dense weight.
    """

    name = "tucker"
    Options = TuckerOptions
    options: TuckerOptions
    Layout = TuckerLayout

    def _heads(self, spec: GroupSpec) -> str:
        if self.options.heads != "auto":
            return self.options.heads
        if spec.family in ATTENTION_ROWS:
            return "rows"
        return "cols" if spec.family in ATTENTION_COLS else "none"

    def dims(self, spec: GroupSpec) -> list[int]:
        heads = self._heads(spec)
        head_dim = self.options.head_dim or spec.head_dim
        if heads != "none" and head_dim is None:
            raise AecompressError(f"{spec.name}: the model has no head size: set head_dim")
        return tensor_dims(spec.count, spec.rows, spec.cols, heads, head_dim or 1, spec.name)

    def check(self, spec: GroupSpec) -> None:
        self.dims(spec)

    def cost(self, width: Width, spec: GroupSpec) -> int:
        assert isinstance(width, tuple)
        return spec.floats(tucker_cost(self.dims(spec), width))

    def max_width(self, spec: GroupSpec) -> int:
        return max(self.dims(spec))

    def larger(self, width: Width, spec: GroupSpec) -> list[Width]:
        assert isinstance(width, tuple)
        dims = self.dims(spec)
        grown = [tuple(_step(list(width), mode, 1)) for mode in range(len(dims))]
        return [ranks for ranks in grown if _valid(dims, ranks)]

    def solve_width(self, matrices: Sequence[torch.Tensor], context: FitContext) -> Width:
        dims = self.dims(context.spec)
        tensor = torch.stack(list(matrices)).double().reshape(dims)
        numbers = context.budget / context.spec.float_bits  # every stored tensor is floating
        return tuple(tucker_ranks(dims, mode_spectra(tensor), numbers, context.spec.name))

    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        assert isinstance(width, tuple)
        spec = context.spec
        dims = self.dims(spec)
        tensor = torch.stack(list(matrices)).double().reshape(dims)
        with tl.backend_context("numpy"):
            core, factors = tucker(
                tensor.numpy(), rank=list(width), n_iter_max=self.options.iterations, init="svd"
            )
        start = [torch.from_numpy(core).float()] + [torch.from_numpy(f).float() for f in factors]
        refined, losses = refine_factors(
            start,
            lambda f: tucker_to_tensor(f[0], f[1:]).reshape(spec.count * spec.rows, spec.cols),
            torch.cat(list(matrices)),
            self.options,
            desc=f"tucker {spec.name}",
            progress=context.progress,
        )
        shared = {"core": refined[0]} | {f"factor{j}": f for j, f in enumerate(refined[1:])}
        layout = TuckerLayout(dims=dims, layers=spec.count, shape=(spec.rows, spec.cols))
        return Stored(shared, [{} for _ in range(spec.count)], width, layout, losses)

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        layout = stored.layout
        assert isinstance(layout, TuckerLayout)
        factors = [stored.shared[f"factor{j}"] for j in range(len(layout.dims))]
        if layout.layers > 1:
            factors[0] = factors[0][index : index + 1]
        tensor = tucker_to_tensor(stored.shared["core"], factors)
        return tensor.reshape(layout.shape)
