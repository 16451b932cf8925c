"""Truncated SVD and its weighted variants: scale, truncated SVD, unscale.

Every method here stores, for a group of matrices stacked row-wise [K*n, m], one shared
basis B [r, m] and per member the coefficients A_i [n, r] (any scaling is folded into A
and B: nothing else is stored), at the largest rank r whose K*n*r + r*m numbers fit the
budget. Each is served as a LowRankLinear / LowRankEmbedding. They differ in the error
they minimise, i.e. in the scaling chosen before the SVD:

  svd            ||W - W_hat||_F                       no scaling
  fwsvd          ||diag(c) (W - W_hat)||_F             rows, c_i = sqrt(sum_j Fisher_ij)
  asvd           ||(W - W_hat) diag(s)||_F             columns, s = mean|x|^alpha
  svdllm         ||(W - W_hat) L||_F = ||(W - W_hat) X^T||_F   L L^T = X^T X (whitening)
  shared-basis   svdllm for a stack of layers: one basis, pooled X^T X, per-layer refit

Embeddings ([vocab, hidden], one row per token): the input of a lookup is one-hot, so its
X^T X is diag(token counts) and an activation-aware scaling weights ROWS: svdllm by
sqrt(counts + ridge), asvd by (counts + ridge)^alpha (the same for alpha 0.5).

A row scaling never needs inverting: with D W S = U S V^T, the optimum is
W_hat = W S V_r V_r^T S^-1, so A = W S V_r and B = V_r^T S^-1 (rows with zero weight are
projected on the basis like the others). Only the column scaling S must be invertible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from aecompress.budget import solve_width
from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from aecompress.methods.base import FitContext, Method, MethodOptions, Stored, register
from aecompress.modules import LowRankEmbedding, LowRankLinear

logger = logging.getLogger(__name__)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (A = U_r S_r, B = V_r^T) of `matrix` in Frobenius norm."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(matrix.dtype), vh[:rank].to(matrix.dtype)


@dataclass(frozen=True)
class Scaling:
    """An invertible right scaling S of a matrix's columns and its inverse (float64).

    A vector stands for a diagonal matrix (ASVD), a square matrix is applied as W @ S
    (the whitening factor of SVD-LLM).
    """

    forward: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def diagonal(cls, scale: torch.Tensor) -> Scaling:
        scale = scale.double()
        return cls(scale, 1 / scale)

    @staticmethod
    def _apply(matrix: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        return matrix * by if by.dim() == 1 else matrix @ by

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._apply(matrix, self.forward)

    def undo(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._apply(matrix, self.inverse)


def weighted_svd(
    matrix: torch.Tensor,
    rank: int,
    rows: torch.Tensor | None = None,
    cols: Scaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors A [N, r], B [r, m] minimising ||diag(rows) (M - A B) S||_F.

    Scale, truncated SVD, unscale: V_r are the top right singular vectors of
    diag(rows) M S; A = M S V_r, B = V_r^T S^-1. `rows` are non-negative row weights,
    `cols` an invertible column scaling; None means no scaling on that side.
    """
    scaled = matrix.double()
    if cols is not None:
        scaled = cols.apply(scaled)
    weighted = scaled if rows is None else scaled * rows.double()[:, None]
    _, _, vh = torch.linalg.svd(weighted, full_matrices=False)
    basis = vh[:rank]
    a, b = scaled @ basis.T, basis
    if cols is not None:
        b = cols.undo(b)
    return a.to(matrix.dtype), b.to(matrix.dtype)


def whitening(xtx: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """L (lower triangular) with L L^T = X^T X + lambda I, and L^-1, both float64.

    lambda = ridge * trace(X^T X) / in (relative to the mean input energy). When the
    Cholesky factorisation still fails (X^T X singular or not quite PSD numerically),
    lambda grows tenfold until it succeeds. An all-zero X^T X (an input never seen) gives
    the identity. Then ||(W - W_hat) L||_F^2 = ||(W - W_hat) X^T||_F^2 + lambda ||W - W_hat||_F^2.
    """
    xtx = xtx.double()
    if not torch.isfinite(xtx).all():
        raise AecompressError("X^T X has NaN or infinite entries: cannot whiten")
    size = xtx.shape[0]
    eye = torch.eye(size, dtype=torch.float64)
    mean = (torch.trace(xtx) / size).item()
    if mean <= 0:
        logger.warning("X^T X is zero (input never seen): whitening with the identity")
        return eye, eye
    symmetric = (xtx + xtx.T) / 2
    shift = ridge * mean
    while True:
        factor, info = torch.linalg.cholesky_ex(symmetric + shift * eye)
        if info.item() == 0:
            break
        if shift > mean:  # cannot happen for a PSD input; guards against a bad one
            raise AecompressError("X^T X is not positive semi-definite: cannot whiten")
        shift = max(10 * shift, 1e-10 * mean)
        logger.warning("X^T X is singular: ridge raised to %.1e of its mean diagonal", shift / mean)
    inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
    return factor, inverse


def refit_coefficients(
    matrix: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor
) -> torch.Tensor:
    """A [n, r] minimising ||(W - A B) L||_F given the basis B [r, m], gram = L L^T.

    The normal equations A (B G B^T) = W G B^T, solved in float64 (the output error of
    one layer's inputs for a basis chosen on other data, e.g. a stack of layers).
    """
    basis, gram = basis.double(), gram.double()
    projected = basis @ gram  # [r, m]
    normal = projected @ basis.T  # B G B^T, [r, r]
    return torch.linalg.solve(normal, projected @ matrix.double().T).T.to(matrix.dtype)


def stacked_rank(count: int, rows: int, cols: int, budget: float, group: str) -> int:
    """Largest rank r with count*rows*r (per-member A) + r*cols (shared B) within budget."""
    return solve_width(
        lambda r: count * rows * r + r * cols, budget, min(count * rows, cols), group
    )


def member_statistics(context: FitContext, index: int) -> TargetStatistics:
    """Calibration statistics of member `index` (a clear error when there are none)."""
    if context.statistics is None or index >= len(context.statistics):
        raise AecompressError(f"{context.group}: this method needs calibration statistics")
    return context.statistics[index]


def _field(context: FitContext, index: int, name: str) -> torch.Tensor:
    value = getattr(member_statistics(context, index), name)
    if value is None:
        raise AecompressError(f"{context.group}: calibration statistic '{name}' is missing")
    return value.double()


def is_embedding(context: FitContext) -> bool:
    """Whether the group is a token embedding: calibration gives token counts only there."""
    return context.statistics is not None and context.statistics[0].counts is not None


def count_weights(context: FitContext, ridge: float) -> torch.Tensor:
    """Token counts + ridge * mean count: the diagonal of an embedding's X^T X (+ ridge)."""
    counts = _field(context, 0, "counts")
    return counts + ridge * counts.mean()


@register
class SVD(Method):
    """Truncated SVD of the group's row-stacked matrix [K*n, m].

    Stores per member A_i [n, r] (its rows of U_r S_r) and one shared basis B = V_r^T [r, m];
    minimises the Frobenius error of the stacked matrix. Served as a LowRankLinear.
    Subclasses only choose the scaling (see the module docstring).
    """

    name = "svd"

    def scaling(
        self, matrices: Sequence[torch.Tensor], context: FitContext
    ) -> tuple[torch.Tensor | None, Scaling | None]:
        """Row weights [K*n] and column scaling of the stacked matrix (None: unscaled)."""
        return None, None

    def fit(self, matrices: Sequence[torch.Tensor], budget: float, context: FitContext) -> Stored:
        rows, cols = matrices[0].shape
        rank = stacked_rank(len(matrices), rows, cols, budget, context.group)
        row_weights, col_scaling = self.scaling(matrices, context)
        a, b = weighted_svd(torch.cat(list(matrices)), rank, row_weights, col_scaling)
        return Stored({"b": b}, [{"a": part} for part in a.split(rows)], {"rank": rank})

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        return stored.members[index]["a"] @ stored.shared["b"]

    def linear(self, stored: Stored, index: int, bias: torch.Tensor | None) -> nn.Module:
        return LowRankLinear(stored.members[index]["a"], stored.shared["b"], bias)

    def embedding(self, stored: Stored, index: int, padding_idx: int | None) -> nn.Module:
        return LowRankEmbedding(stored.members[index]["a"], stored.shared["b"], padding_idx)


@register
class FWSVD(SVD):
    """Fisher-weighted SVD (Hsu et al. 2022), row-wise: stores A_i, B as svd.

    Minimises ||diag(c) (W - W_hat)||_F with c_i = sqrt(sum_j F_ij), F the Fisher
    information (squared LM-loss gradients over calibration text) of each weight. A stack
    of layers keeps each row's own weight.
    """

    name = "fwsvd"

    def statistics_needed(self) -> set[str]:
        return {"fisher"}

    def scaling(
        self, matrices: Sequence[torch.Tensor], context: FitContext
    ) -> tuple[torch.Tensor | None, Scaling | None]:
        weights = [_field(context, i, "fisher").sum(1).sqrt() for i in range(len(matrices))]
        return torch.cat(weights), None


class ActivationOptions(MethodOptions):
    """`count_ridge`: embeddings only, added to every token's calibration count, relative
    to the mean count, so that tokens unseen in calibration keep some weight."""

    count_ridge: float = Field(0.1, ge=0)


class ASVDOptions(ActivationOptions):
    alpha: float = Field(0.5, ge=0)


@register
class ASVD(SVD):
    """Activation-aware SVD (Yuan et al. 2023): stores A_i, B as svd.

    Minimises ||(W - W_hat) diag(s)||_F with s_j = mean|x_j|^alpha over calibration
    inputs (pooled over the layers of a stack, weighted by their token counts; channels
    never active get 1e-6 of the mean, so S stays invertible). Embeddings weight rows by
    (count + ridge)^alpha instead.
    """

    name = "asvd"
    Options = ASVDOptions
    options: ASVDOptions

    def statistics_needed(self) -> set[str]:
        return {"abs_mean", "counts"}

    def scaling(
        self, matrices: Sequence[torch.Tensor], context: FitContext
    ) -> tuple[torch.Tensor | None, Scaling | None]:
        alpha = self.options.alpha
        if is_embedding(context):
            return count_weights(context, self.options.count_ridge).pow(alpha), None
        tokens = [member_statistics(context, i).tokens for i in range(len(matrices))]
        pooled = sum(t * _field(context, i, "abs_mean") for i, t in enumerate(tokens))
        mean = torch.as_tensor(pooled) / max(sum(tokens), 1)
        mean = mean.clamp_min(1e-6 * mean.mean().item() + 1e-30)
        return None, Scaling.diagonal(mean.pow(alpha))


class WhiteningOptions(ActivationOptions):
    """`ridge`: added to X^T X relative to its mean diagonal (see `whitening`)."""

    ridge: float = Field(1e-4, ge=0)


@register
class SVDLLM(SVD):
    """SVD-LLM (Wang et al. 2024) truncation-aware whitening: stores A_i, B as svd.

    Minimises the output error ||(W - W_hat) X^T||_F (+ ridge) over calibration inputs X:
    with L the Cholesky factor of X^T X + ridge, the SVD of W L truncated, times L^-1.
    Per matrix only: layers whiten differently, so a stack cannot share one basis this
    way (use `shared-basis`). Embeddings weight rows by sqrt(count + ridge).
    """

    name = "svdllm"
    Options = WhiteningOptions
    options: WhiteningOptions

    def statistics_needed(self) -> set[str]:
        return {"xtx", "counts"}

    def fit(self, matrices: Sequence[torch.Tensor], budget: float, context: FitContext) -> Stored:
        if len(matrices) > 1:
            raise AecompressError(
                f"{context.group}: svdllm whitens each matrix with its own X^T X, so "
                f"{len(matrices)} stacked layers cannot share its basis: use --method "
                "shared-basis (one basis, pooled whitening) or --group none"
            )
        return super().fit(matrices, budget, context)

    def pooled_xtx(self, count: int, context: FitContext) -> torch.Tensor:
        return torch.stack([_field(context, i, "xtx") for i in range(count)]).sum(0)

    def scaling(
        self, matrices: Sequence[torch.Tensor], context: FitContext
    ) -> tuple[torch.Tensor | None, Scaling | None]:
        if is_embedding(context):
            return count_weights(context, self.options.count_ridge).sqrt(), None
        factor, inverse = whitening(self.pooled_xtx(len(matrices), context), self.options.ridge)
        return None, Scaling(factor, inverse)


class SharedBasisOptions(WhiteningOptions):
    """`refit`: refit each layer's coefficients to its own whitened error (exact, cheap)."""

    refit: bool = True


@register
class SharedBasis(SVDLLM):
    """Basis Sharing (Wang et al. 2024): one basis B [r, m] for K stacked layers, per-layer
    coefficients A_i [n, r] (stored as svd), for `--group layers` / `layers:K`.

    B comes from the SVD of the stacked [W_1; ...; W_K] L, L the Cholesky factor of the
    pooled sum_i X_i^T X_i; then (refit) each A_i minimises its own layer's output error
    ||(W_i - A_i B) X_i^T||_F given B (least squares). With one member it is svdllm.
    """

    name = "shared-basis"
    Options = SharedBasisOptions
    options: SharedBasisOptions

    def fit(self, matrices: Sequence[torch.Tensor], budget: float, context: FitContext) -> Stored:
        stored = SVD.fit(self, matrices, budget, context)
        if self.options.refit and len(matrices) > 1 and not is_embedding(context):
            for index, matrix in enumerate(matrices):
                factor, _ = whitening(_field(context, index, "xtx"), self.options.ridge)
                gram = factor @ factor.T  # X_i^T X_i + ridge
                coefficients = refit_coefficients(matrix, stored.shared["b"], gram)
                stored.members[index]["a"] = coefficients.contiguous()
        return stored
