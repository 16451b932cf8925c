"""Truncated SVD: the factorisation baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from aecompress.budget import solve_width
from aecompress.methods.base import FitContext, Method, Stored, register
from aecompress.modules import LowRankEmbedding, LowRankLinear


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (A = U_r S_r, B = V_r^T) of `matrix` in Frobenius norm."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(matrix.dtype), vh[:rank].to(matrix.dtype)


def stacked_rank(count: int, rows: int, cols: int, budget: float, group: str) -> int:
    """Largest rank r with count*rows*r (per-member A) + r*cols (shared B) within budget."""
    return solve_width(
        lambda r: count * rows * r + r * cols, budget, min(count * rows, cols), group
    )


@register
class SVD(Method):
    """Truncated SVD of the group's row-stacked matrix [L*n, m].

    Stores per member A_i [n, r] (its rows of U_r S_r) and one shared basis B = V_r^T [r, m];
    minimises the Frobenius error of the stacked matrix. Served as a LowRankLinear.
    """

    name = "svd"

    def fit(self, matrices: Sequence[torch.Tensor], budget: float, context: FitContext) -> Stored:
        rows, cols = matrices[0].shape
        rank = stacked_rank(len(matrices), rows, cols, budget, context.group)
        a, b = truncated_svd(torch.cat(list(matrices)), rank)
        return Stored({"b": b}, [{"a": part} for part in a.split(rows)], {"rank": rank})

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        return stored.members[index]["a"] @ stored.shared["b"]

    def linear(self, stored: Stored, index: int, bias: torch.Tensor | None) -> nn.Module:
        return LowRankLinear(stored.members[index]["a"], stored.shared["b"], bias)

    def embedding(self, stored: Stored, index: int, padding_idx: int | None) -> nn.Module:
        return LowRankEmbedding(stored.members[index]["a"], stored.shared["b"], padding_idx)
