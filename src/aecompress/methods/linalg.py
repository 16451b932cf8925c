"""Linear algebra the methods share: weighted truncated SVD, whitening, least-squares refits,
and per-row importance weights from calibration statistics.

A weighted SVD scales the matrix, truncates, and unscales. A row scaling never needs
inverting: with D M S = U S V^T, the optimum of ||D (M - M_hat) S||_F at rank r is
M_hat = M S V_r V_r^T S^-1, i.e. A = M (S V_r) and B = V_r^T S^-1. Only the column scaling
S must be invertible.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from aecompress.errors import AecompressError
from aecompress.numerics import all_finite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scaling:
    """An invertible right scaling S of a matrix's columns (float64): a vector stands for a
    diagonal matrix (ASVD), a square matrix is lower triangular and applied as M @ S (the
    whitening factor L of SVD-LLM). S^-1 is never formed: undoing L is a triangular solve.
    """

    forward: torch.Tensor

    @classmethod
    def diagonal(cls, scale: torch.Tensor) -> Scaling:
        return cls(scale.double())

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """M @ S."""
        return matrix * self.forward if self.forward.dim() == 1 else matrix @ self.forward

    def undo(self, matrix: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """M @ S^-1 (written over `matrix` when `in_place`)."""
        out = matrix if in_place else None
        if self.forward.dim() == 1:
            return torch.div(matrix, self.forward, out=out)
        return torch.linalg.solve_triangular(self.forward, matrix, upper=False, left=False, out=out)

    def left(self, matrix: torch.Tensor) -> torch.Tensor:
        """S @ matrix."""
        return self.forward[:, None] * matrix if self.forward.dim() == 1 else self.forward @ matrix

    def left_transposed(self, matrix: torch.Tensor) -> torch.Tensor:
        """S^T @ matrix."""
        if self.forward.dim() == 1:
            return self.forward[:, None] * matrix
        return self.forward.T @ matrix

    def columns(self, matrix: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """(M @ S)[:, start:stop]."""
        if self.forward.dim() == 1:
            return matrix[:, start:stop] * self.forward[start:stop]
        return matrix @ self.forward[:, start:stop]


CHUNK_NUMBERS = 2**21  # entries of a matrix converted to float64 at a time (16 MB)


def _weighted_rows(
    matrix: torch.Tensor, rows: torch.Tensor | None, cols: Scaling | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float64 chunk) of diag(rows) M S, CHUNK_NUMBERS entries at a time."""
    step = max(1, CHUNK_NUMBERS // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], step):
        chunk = matrix[start : start + step].double()
        if cols is not None:
            chunk = cols.apply(chunk)
        if rows is not None:
            chunk = chunk * rows[start : start + step].double()[:, None]
        yield start, chunk


def _weighted_columns(
    matrix: torch.Tensor, rows: torch.Tensor | None, cols: Scaling | None
) -> Iterator[torch.Tensor]:
    """float64 column chunks of diag(rows) M S, CHUNK_NUMBERS entries at a time (each made
    from row chunks of M: no float64 copy of M)."""
    count, size = matrix.shape
    step = max(1, CHUNK_NUMBERS // max(1, count))
    for stop in range(step, size + step, step):
        start, stop = stop - step, min(stop, size)
        chunk = torch.empty(count, stop - start, dtype=torch.float64, device=matrix.device)
        for first, part in _weighted_rows(matrix, rows, None):
            end = first + part.shape[0]
            chunk[first:end] = (
                part[:, start:stop] if cols is None else cols.columns(part, start, stop)
            )
        yield chunk


def _times_transposed(
    matrix: torch.Tensor, rows: torch.Tensor | None, cols: Scaling | None, other: torch.Tensor
) -> torch.Tensor:
    """(diag(rows) M S)^T @ other, float64, by row chunks of M."""
    other = other if rows is None else rows.double()[:, None] * other
    total = torch.zeros(matrix.shape[1], other.shape[1], dtype=torch.float64, device=other.device)
    for first, part in _weighted_rows(matrix, None, None):
        total.addmm_(part.T, other[first : first + part.shape[0]])
    return total if cols is None else cols.left_transposed(total)


def top_right_singular_vectors(
    matrix: torch.Tensor,
    rank: int,
    rows: torch.Tensor | None = None,
    cols: Scaling | None = None,
) -> torch.Tensor:
    """The top-`rank` right singular vectors [m, rank] of P = diag(rows) M S (M [n, m];
    None: no scaling on that side), float64, from the smaller of P's two Gram matrices
    (much faster and smaller than an SVD), summed over chunks: P is never formed. Tall:
    eigenvectors of P^T P. Wide: V_r = P^T U_r / s_r from those of P P^T, or the SVD of P
    itself when s_r is below 1e-4 s_1 (V_r would lose orthogonality)."""
    count, size = matrix.shape
    tall = count >= size
    side = min(count, size)
    gram = torch.zeros(side, side, dtype=torch.float64, device=matrix.device)
    if tall:
        for _, part in _weighted_rows(matrix, rows, cols):
            gram.addmm_(part.T, part)
    else:
        for part in _weighted_columns(matrix, rows, cols):
            gram.addmm_(part, part.T)
    values, vectors = torch.linalg.eigh(gram)
    del gram
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    if tall:
        return vectors.contiguous()
    if values[-1] > 1e-8 * values[0]:
        vectors = _times_transposed(matrix, rows, cols, vectors)
        vectors /= values.sqrt()
        return vectors
    weighted = torch.cat([chunk for _, chunk in _weighted_rows(matrix, rows, cols)])
    _, _, vh = torch.linalg.svd(weighted, full_matrices=False)
    return vh[:rank].T.contiguous()


def weighted_bases(
    matrix: torch.Tensor,
    rank: int,
    rows: torch.Tensor | None = None,
    cols: Scaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode [m, r] and decode [r, m] bases of the rank-r optimum of
    ||diag(rows) (M - M_hat) S||_F: M_hat = (M @ encode) @ decode, float64.

    encode = S V_r and decode = V_r^T S^-1, V_r the top right singular vectors of
    diag(rows) M S. `rows` are non-negative row weights, `cols` an invertible column
    scaling; None means no scaling on that side.
    """
    vectors = top_right_singular_vectors(matrix.detach(), rank, rows, cols)
    if cols is None:
        return vectors, vectors.T
    return cols.left(vectors), cols.undo(vectors.T, in_place=True)


def weighted_svd(
    matrix: torch.Tensor,
    rank: int,
    rows: torch.Tensor | None = None,
    cols: Scaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors A [N, r], B [r, m] minimising ||diag(rows) (M - A B) S||_F
    (see weighted_bases), in the matrix's dtype."""
    matrix = matrix.detach()
    encode, decode = weighted_bases(matrix, rank, rows, cols)
    coefficients = matrix.new_empty(matrix.shape[0], encode.shape[1])
    for start, chunk in _weighted_rows(matrix, None, None):  # no float64 copy of the whole
        coefficients[start : start + chunk.shape[0]] = chunk @ encode
    return coefficients, decode.to(matrix.dtype)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (A = U_r S_r, B = V_r^T) of `matrix` in Frobenius norm."""
    return weighted_svd(matrix, rank)


def column_major(size: int, device: torch.device) -> torch.Tensor:
    """An empty float64 size x size matrix laid out column-major (a transposed view): LAPACK
    factorises it in place (`out=` itself) without a copy."""
    return torch.empty(size, size, dtype=torch.float64, device=device).T


def whitening(xtx: torch.Tensor, ridge: float = 1e-4, overwrite: bool = False) -> torch.Tensor:
    """L (lower triangular, float64) with L L^T = X^T X + lambda I.

    lambda = ridge * trace(X^T X) / in (relative to the mean input energy). When the
    Cholesky factorisation still fails (X^T X singular or not quite PSD numerically),
    lambda grows tenfold until it succeeds. An all-zero X^T X (an input never seen) gives
    the identity. Then ||(W - W_hat) L||_F^2 = ||(W - W_hat) X^T||_F^2 + lambda ||W - W_hat||_F^2.
    L is factorised in place in column-major order (a transposed view: LAPACK needs no
    copy), in a new float64 m x m matrix, or with `overwrite` in `xtx` itself (float64; a
    float32 copy is kept to start again from should the factorisation fail). Either way
    L reads the upper triangle of `xtx` (X^T X is symmetric up to rounding).
    """
    if not all_finite(xtx):
        raise AecompressError("X^T X has NaN or infinite entries: cannot whiten")
    size = xtx.shape[0]
    mean = (xtx.diagonal().double().sum() / size).item()
    if mean <= 0:
        logger.warning("X^T X is zero (input never seen): whitening with the identity")
        return torch.eye(size, dtype=torch.float64, device=xtx.device)
    overwrite = overwrite and xtx.dtype == torch.float64 and xtx.is_contiguous()
    factor = xtx.T if overwrite else column_major(size, xtx.device)
    source = xtx.float() if overwrite else xtx
    info = torch.empty((), dtype=torch.int32, device=xtx.device)
    shift = ridge * mean
    while True:
        if not overwrite or shift > ridge * mean:  # the first attempt finds xtx in place
            factor.copy_(source.T)
        factor.diagonal().add_(shift)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if info.item() == 0:
            return factor
        if shift > mean:  # cannot happen for a PSD input; guards against a bad one
            raise AecompressError("X^T X is not positive semi-definite: cannot whiten")
        shift = max(10 * shift, 1e-10 * mean)
        logger.warning("X^T X is singular: ridge raised to %.1e of its mean diagonal", shift / mean)


def inverse_cholesky(xtx: torch.Tensor, damp: float, overwrite: bool = False) -> torch.Tensor:
    """U (upper, float64) with U^T U = (X^T X + damp * mean diag I)^-1, the diagonal of
    inputs never seen set to 1: one m x m matrix (a new one, or with `overwrite` `xtx`
    itself) factorised, inverted and factorised again in place (no float32 copy beside
    it: the caller converts the rows it uses)."""
    overwrite = overwrite and xtx.dtype == torch.float64 and xtx.is_contiguous()
    factor = xtx.T if overwrite else column_major(xtx.shape[0], xtx.device).copy_(xtx.T)
    diagonal = factor.diagonal()
    diagonal[diagonal == 0] = 1
    diagonal += damp * diagonal.mean()
    torch.linalg.cholesky(factor, out=factor)
    torch.cholesky_inverse(factor, out=factor)
    torch.linalg.cholesky(factor, upper=True, out=factor)
    return factor


def summed(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of `tensors` (the tensor itself when there is one: no copy)."""
    if len(tensors) == 1:
        return tensors[0]
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


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
