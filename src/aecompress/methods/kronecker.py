"""Sums of Kronecker products, initialised by Van Loan's rearrangement, refined by the AE loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
from aecompress.methods.linalg import truncated_svd
from aecompress.methods.losses import RefineOptions, refine_factors


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


def factor_shapes(rows: int, cols: int, count: int) -> tuple[int, int]:
    """(n1, m1) minimising the numbers one term costs, count*n1*m1 (A, per member) +
    n2*m2 (B, shared), with n = n1*n2, m = m1*m2; ties go to the squarer factors."""
    best: tuple[float, int, int] | None = None
    for n1 in _divisors(rows):
        for m1 in _divisors(cols):
            cost = count * n1 * m1 + (rows // n1) * (cols // m1)
            balance = abs(n1 / (rows // n1) - 1) + abs(m1 / (cols // m1) - 1)
            key = (cost + balance / (rows + cols), n1, m1)
            best = key if best is None or key < best else best
    assert best is not None
    return best[1], best[2]


def rearrange(matrix: torch.Tensor, n1: int, m1: int) -> torch.Tensor:
    """Van Loan's R(W) [n1*m1, n2*m2]: row (a, c) is the block W[a*n2:(a+1)*n2, c*m2:...]
    flattened, so that W = sum_r A_r (x) B_r iff R(W) = sum_r vec(A_r) vec(B_r)^T."""
    rows, cols = matrix.shape
    n2, m2 = rows // n1, cols // m1
    return matrix.reshape(n1, n2, m1, m2).permute(0, 2, 1, 3).reshape(n1 * m1, n2 * m2)


def kronecker_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_r A_r (x) B_r for A [R, n1, m1], B [R, n2, m2]: a [n1*n2, m1*m2] matrix (one
    product vec(A)^T vec(B) = R(W), rearranged back)."""
    terms, n1, m1 = a.shape
    n2, m2 = b.shape[1], b.shape[2]
    product = a.reshape(terms, n1 * m1).T @ b.reshape(terms, n2 * m2)
    return product.reshape(n1, m1, n2, m2).permute(0, 2, 1, 3).reshape(n1 * n2, m1 * m2)


class KroneckerOptions(RefineOptions):
    """`shape`: (n1, m1) of the A factors (default: the cheapest per term, factor_shapes)."""

    shape: tuple[int, int] | None = None


class KroneckerLayout(MethodLayout):
    """(n1, m1) of the A factors."""

    shape_a: tuple[int, int]


@register
class Kronecker(Method):
    """W_i ~ sum_{r<R} A_{i,r} (x) B_r: stores per member A_i [R, n1, m1] and, shared by
    the group's members, B [R, n2, m2] (n = n1*n2, m = m1*m2); the width is R.

    Initialised with the Frobenius optimum (Van Loan: truncated SVD of the stacked
    rearranged matrices [R(W_1); ...]), then refined by the paper's AE loss over the rows
    (cosine + RMSE) with Adam, keeping the best factors. Served as a decoded dense weight.
    """

    name = "kronecker"
    Options = KroneckerOptions
    options: KroneckerOptions
    Layout = KroneckerLayout

    def factor_shape(self, spec: GroupSpec) -> tuple[int, int]:
        return self.options.shape or factor_shapes(spec.rows, spec.cols, spec.count)

    def check(self, spec: GroupSpec) -> None:
        n1, m1 = self.factor_shape(spec)
        if spec.rows % n1 or spec.cols % m1:
            raise AecompressError(
                f"{spec.name}: shape ({n1}, {m1}) does not divide {spec.rows}x{spec.cols}"
            )

    def cost(self, width: Width, spec: GroupSpec) -> int:
        assert isinstance(width, int)
        n1, m1 = self.factor_shape(spec)
        return spec.floats(width * (spec.count * n1 * m1 + (spec.rows // n1) * (spec.cols // m1)))

    def max_width(self, spec: GroupSpec) -> int:
        n1, m1 = self.factor_shape(spec)
        return min(spec.count * n1 * m1, (spec.rows // n1) * (spec.cols // m1))

    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        assert isinstance(width, int)
        spec = context.spec
        count, terms = spec.count, width
        n1, m1 = self.factor_shape(spec)
        n2, m2 = spec.rows // n1, spec.cols // m1
        stacked = torch.cat([rearrange(m, n1, m1) for m in matrices])
        u, v = truncated_svd(stacked, terms)
        # balance the two factors' norms (in float64: a 1e30 outlier's norm overflows float32)
        scale = u.double().norm(dim=0).clamp_min(1e-30).sqrt().to(u.dtype)
        a = (u / scale).T.reshape(terms, count, n1, m1).transpose(0, 1)
        b = (v * scale[:, None]).reshape(terms, n2, m2)
        (a, b), losses = refine_factors(
            [a, b],
            lambda f: torch.cat([kronecker_sum(f[0][i], f[1]) for i in range(count)]),
            torch.cat(list(matrices)),
            self.options,
            desc=f"kronecker {spec.name}",
            progress=context.progress,
        )
        members = [{"a": a[i].contiguous()} for i in range(count)]
        return Stored({"b": b}, members, terms, KroneckerLayout(shape_a=(n1, m1)), losses)

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        return kronecker_sum(stored.members[index]["a"], stored.shared["b"])
