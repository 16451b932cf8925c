"""Sparse plus low-rank (OATS-style), both parts measured in the layer's output error.

W ~ S + L: S sparse (kept values + positions, pruned by SparseGPT's OBS updates) and L low
rank (SVD-LLM's whitened truncation, or the data-aware AE starting from it). The two are
alternated: L fits W - S, then S fits W - L, each minimising ||(W - S - L) X^T||; the
low-rank part gets `share` of the budget, the sparse part the rest (positions counted).
With a quantization stage both parts are stored as codes: the low-rank part as its method
stores them (svdllm: GPTQ-compensated factors; ae-data: its codec's codes and decoder), the
sparse part's kept values quantized inside its last OBS sweep (as sparsegpt's), on the
residual of the quantized low-rank part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import Field

from aecompress.budget import solve_width
from aecompress.errors import AecompressError
from aecompress.methods.base import (
    FitContext,
    GroupSpec,
    Method,
    MethodLayout,
    MethodOptions,
    Stored,
    Width,
    make_method,
    register,
)
from aecompress.methods.linalg import Scaling, weighted_svd, whitening
from aecompress.methods.pruning import (
    Kept,
    SparseLayout,
    decode_sparse,
    encode_sparse,
    joint_grid,
    obs_prune,
    position_cost,
    quantize_kept,
    value_bits,
)
from aecompress.methods.quantize import Grid
from aecompress.methods.stage import QuantizedLayout


class SparseLowRankOptions(MethodOptions):
    """`share`: the low-rank part's fraction of the budget; `iterations`: alternations;
    `lowrank`: the method of the low-rank part and its `lowrank_options`; `index`: how the
    sparse positions are stored (auto: the cheaper); `damp`, `block_size`: SparseGPT's;
    `ridge`: SVD-LLM's whitening ridge during the alternation."""

    share: float = Field(0.25, gt=0, lt=1)
    iterations: int = Field(3, ge=1)
    lowrank: Literal["svdllm", "ae-data"] = "svdllm"
    lowrank_options: dict[str, Any] = Field(default_factory=dict)
    index: Literal["bitmap", "int32", "auto"] = "auto"
    damp: float = Field(0.01, ge=0)
    block_size: int = Field(128, ge=1)
    ridge: float = Field(1e-4, ge=0)


class SparseLowRankLayout(MethodLayout):
    """The sparse part's layout and the low-rank part's width and layout."""

    sparse: SparseLayout
    lowrank_width: int
    lowrank_layout: dict[str, Any]


@register
class SparseLowRank(Method):
    """Sparse + low-rank: stores the low-rank part's tensors (`lowrank.*`: svdllm's A, B or
    ae-data's codes and decoder) and the sparse part's kept values + positions; the width
    is (low-rank width, kept weights). Minimises the output error ||(W - S - L) X^T||
    by alternation (module docstring). One matrix per group; served decoded."""

    name = "sparse-lowrank"
    Options = SparseLowRankOptions
    options: SparseLowRankOptions
    Layout = SparseLowRankLayout
    quantizable = True

    def __init__(self, options: MethodOptions) -> None:
        super().__init__(options)
        self.lowrank = make_method(self.options.lowrank, self.options.lowrank_options)

    def statistics_needed(self) -> set[str]:
        return {"xtx"} | self.lowrank.statistics_needed()

    def stage_runs_gptq(self) -> bool:
        return self.lowrank.stage_runs_gptq()

    def check(self, spec: GroupSpec) -> None:
        if spec.count > 1 or spec.kind == "embedding":
            raise AecompressError(
                f"{spec.name}: sparse-lowrank fits one layer's matrix under its inputs "
                "(use --group none, and another method for embeddings)"
            )
        self.lowrank.check(spec)

    def _scheme(self, kept: int, spec: GroupSpec) -> Literal["bitmap", "int32"]:
        schemes: list[Literal["bitmap", "int32"]] = (
            ["bitmap", "int32"] if self.options.index == "auto" else [self.options.index]
        )
        return min(schemes, key=lambda s: position_cost(s, kept, spec, None))

    def cost(self, width: Width, spec: GroupSpec) -> int:
        assert isinstance(width, tuple)
        rank, kept = width
        positions = position_cost(self._scheme(kept, spec), kept, spec, None)
        return self.lowrank.cost(rank, spec) + value_bits(kept, spec) + positions

    def max_width(self, spec: GroupSpec) -> int:
        return spec.numel

    def larger(self, width: Width, spec: GroupSpec) -> list[Width]:
        """Tight in the kept weights: the low-rank width is the share's."""
        assert isinstance(width, tuple)
        return [(width[0], width[1] + 1)] if width[1] < spec.numel else []

    def solve_width(self, matrices: Sequence[torch.Tensor], context: FitContext) -> Width:
        spec, budget = context.spec, context.budget
        share = FitContext(spec, self.options.share * budget)
        rank = self.lowrank.solve_width(matrices, share)
        assert isinstance(rank, int)
        kept = solve_width(
            lambda k: self.cost((rank, k), spec), budget, spec.numel, f"{spec.name} (sparse part)"
        )
        return rank, kept

    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        assert isinstance(width, tuple)
        rank, kept = width
        weight, xtx = matrices[0].float(), context.statistic(0, "xtx")
        scaling = Scaling(whitening(xtx, self.options.ridge))
        sparse = torch.zeros_like(weight)
        for _ in range(self.options.iterations):
            a, b = weighted_svd(weight - sparse, rank, None, scaling)
            mask, values = self._prune(weight - a @ b, xtx, kept)
            sparse = values * mask
        lowrank = self.lowrank.fit([weight - sparse], rank, replace(context, owns_statistics=False))
        spec = context.spec
        residual = weight - self.lowrank.reconstruct(lowrank, 0).detach()
        grid = joint_grid(residual, spec)
        mask, values = self._prune(residual, xtx, kept, grid)
        scheme = self._scheme(kept, spec)
        quantized = None
        if spec.quantize is not None:
            quantized = QuantizedLayout(stage=spec.quantize, cols={"values": spec.cols})
        layout = SparseLowRankLayout(
            sparse=SparseLayout(shape=(spec.rows, spec.cols), index=scheme, quantize=quantized),
            lowrank_width=rank,
            lowrank_layout=lowrank.layout.model_dump(mode="json"),
            quantize=quantized,
        )
        member = {f"lowrank.{k}": t for k, t in lowrank.members[0].items()}
        member |= encode_sparse(mask, values, scheme, None)
        if spec.quantize is not None:
            del member["values"]
            member |= quantize_kept(Kept(mask, values, grid), spec)
        shared = {f"lowrank.{k}": t for k, t in lowrank.shared.items()}
        info = {
            "lowrank": self.options.lowrank,
            "lowrank_info": lowrank.info,
            "density": kept / spec.numel,
        }
        return Stored(shared, [member], (rank, kept), layout, info)

    def _prune(
        self, residual: torch.Tensor, xtx: torch.Tensor, kept: int, grid: Grid | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask, values = obs_prune(
            residual,
            xtx,
            kept,
            damp=self.options.damp,
            block_size=self.options.block_size,
            grid=grid,
        )
        return mask, values

    def _parts(self, stored: Stored, index: int) -> tuple[Stored, dict[str, torch.Tensor]]:
        layout = stored.layout
        assert isinstance(layout, SparseLowRankLayout)
        member = stored.members[index]
        lowrank = Stored(
            {k.removeprefix("lowrank."): t for k, t in stored.shared.items()},
            [
                {
                    k.removeprefix("lowrank."): t
                    for k, t in member.items()
                    if k.startswith("lowrank.")
                }
            ],
            layout.lowrank_width,
            self.lowrank.Layout.model_validate(layout.lowrank_layout),
        )
        sparse = {k: t for k, t in member.items() if not k.startswith("lowrank.")}
        return lowrank, sparse

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        layout = stored.layout
        assert isinstance(layout, SparseLowRankLayout)
        lowrank, sparse = self._parts(stored, index)
        return self.lowrank.reconstruct(lowrank, 0) + decode_sparse(sparse, layout.sparse)
