"""The SVD family's maths: each method reaches the closed-form optimum of its own error."""

from __future__ import annotations

import pytest
import torch

from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from aecompress.methods import linalg, make_method
from aecompress.methods.linalg import Scaling, weighted_svd, whitening
from aecompress.pipeline.plan import plan_groups
from aecompress.recipe import Recipe
from tests.methods.helpers import embedding_statistics, fit, synthetic_statistics, tiny_llama


def tail_norm(matrix: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the least Frobenius error of any rank-`rank` approximation."""
    return torch.linalg.svdvals(matrix)[rank:].pow(2).sum().sqrt().item()


def fit_rank(name: str, matrices: list[torch.Tensor], rank: int, stats: list, **options: object):
    kind = "embedding" if stats[0].counts is not None else "linear"
    method, stored, _ = fit(
        name, matrices, width=rank, options=options, statistics=stats, kind=kind
    )
    assert stored.width == rank
    return [method.reconstruct(stored, i).double() for i in range(len(matrices))]


def test_whitening_reproduces_the_exact_output_error_optimum():
    """min over rank-r W_hat of ||(W - W_hat) X^T||: W_hat X^T has rank <= r, so the error
    is at least the Eckart-Young tail of W X^T; svdllm attains that bound."""
    torch.manual_seed(0)
    weight = torch.randn(12, 10, dtype=torch.float64)
    stats = synthetic_statistics(10, tokens=200)
    x = torch.linalg.cholesky(stats.xtx).T  # any X with X^T X = xtx gives the same errors
    (approx,) = fit_rank("svdllm", [weight.float()], 4, [stats], ridge=0.0)
    error = torch.linalg.matrix_norm((weight - approx) @ x.T).item()
    assert error == pytest.approx(tail_norm(weight @ x.T, 4), rel=1e-5)
    # and plain SVD, optimal for ||W - W_hat||, is clearly worse on the output error
    (plain,) = fit_rank("svd", [weight.float()], 4, [stats])
    assert torch.linalg.matrix_norm((weight - plain) @ x.T).item() > 1.05 * error


def test_brute_force_never_beats_the_whitened_optimum():
    torch.manual_seed(1)
    weight = torch.randn(6, 5, dtype=torch.float64)
    stats = synthetic_statistics(5, tokens=50, seed=1)
    x = torch.linalg.cholesky(stats.xtx).T
    (approx,) = fit_rank("svdllm", [weight.float()], 2, [stats], ridge=0.0)
    best = torch.linalg.matrix_norm((weight - approx) @ x.T).item()
    a = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([a, b], lr=0.05)
    for _ in range(3000):
        loss = torch.linalg.matrix_norm((weight - a @ b) @ x.T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() >= best * (1 - 1e-6)
    assert loss.item() == pytest.approx(best, rel=1e-3)  # and gradient descent gets there


def test_fwsvd_is_the_optimum_of_the_row_weighted_error():
    torch.manual_seed(2)
    weight = torch.randn(12, 10, dtype=torch.float64)
    stats = synthetic_statistics(10, rows=12)
    rows = stats.fisher.sum(1).sqrt()
    (approx,) = fit_rank("fwsvd", [weight.float()], 3, [stats])
    error = torch.linalg.matrix_norm(rows[:, None] * (weight - approx)).item()
    assert error == pytest.approx(tail_norm(rows[:, None] * weight, 3), rel=1e-5)


def test_asvd_is_the_optimum_of_the_column_scaled_error():
    torch.manual_seed(3)
    weight = torch.randn(12, 10, dtype=torch.float64)
    stats = synthetic_statistics(10)
    scale = stats.abs_mean.pow(0.7)
    (approx,) = fit_rank("asvd", [weight.float()], 3, [stats], alpha=0.7)
    error = torch.linalg.matrix_norm((weight - approx) * scale).item()
    assert error == pytest.approx(tail_norm(weight * scale, 3), rel=1e-5)


@pytest.mark.parametrize("name", ["svdllm", "asvd"])
def test_embeddings_weight_rows_by_sqrt_counts(name: str):
    """An embedding's input is one-hot: X^T X = diag(counts), so whitening weights rows."""
    torch.manual_seed(4)
    table = torch.randn(40, 8, dtype=torch.float64)
    stats = embedding_statistics(40)
    weights = (stats.counts + 0.1 * stats.counts.mean()).sqrt()
    (approx,) = fit_rank(name, [table.float()], 3, [stats])
    error = torch.linalg.matrix_norm(weights[:, None] * (table - approx)).item()
    assert error == pytest.approx(tail_norm(weights[:, None] * table, 3), rel=1e-5)


def test_tokens_unseen_in_calibration_are_projected_on_the_basis():
    torch.manual_seed(5)
    table = torch.randn(30, 8)
    stats = embedding_statistics(30)
    stats.counts[:10] = 0
    method, stored, _ = fit(
        "svdllm",
        [table],
        width=3,
        options={"count_ridge": 0.0},
        statistics=[stats],
        kind="embedding",
    )
    basis = stored.shared["b"]  # orthonormal rows for a row scaling
    torch.testing.assert_close(method.reconstruct(stored, 0), table @ basis.T @ basis)


def test_singular_xtx_does_not_crash():
    torch.manual_seed(6)
    x = torch.randn(4, 10, dtype=torch.float64)  # 4 tokens for 10 channels: rank 4
    x[:, 3] = 0  # and a channel never active
    singular = TargetStatistics(4, x.T @ x, x.abs().mean(0))
    factor = whitening(singular.xtx, ridge=0.0)
    assert torch.isfinite(factor).all()
    eye = torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close(Scaling(factor).undo(factor), eye)
    weight = torch.randn(12, 10)
    for name, options in (("svdllm", {"ridge": 0.0}), ("asvd", {})):
        (approx,) = fit_rank(name, [weight], 3, [singular], **options)
        assert torch.isfinite(approx).all()
    zero = TargetStatistics(0, torch.zeros(10, 10, dtype=torch.float64), torch.zeros(10))
    (approx,) = fit_rank("svdllm", [weight], 3, [zero])
    (plain,) = fit_rank("svd", [weight], 3, [zero])
    torch.testing.assert_close(approx, plain)


def test_whitening_in_place_factorises_the_statistic_itself_with_the_same_result():
    x = torch.randn(40, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    xtx = x.T @ x
    owned = xtx.clone()
    factor = whitening(owned, overwrite=True)
    assert factor.data_ptr() == owned.data_ptr()  # no second m x m matrix
    torch.testing.assert_close(factor, whitening(xtx))


def test_whitening_in_place_starts_again_when_the_ridge_must_grow():
    """A failed factorisation has overwritten X^T X: it starts again from a float32 copy."""
    x = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    xtx = x.T @ x  # rank 6: no factorisation without a ridge
    factor = whitening(xtx.clone(), ridge=0.0, overwrite=True)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor @ factor.T, xtx, atol=1e-5 * xtx.diagonal().mean(), rtol=0)


def test_whitening_rejects_nan_statistics():
    xtx = torch.eye(4, dtype=torch.float64)
    xtx[0, 0] = float("nan")
    with pytest.raises(AecompressError, match="NaN"):
        whitening(xtx)


def test_weighted_svd_without_scaling_is_truncated_svd():
    torch.manual_seed(7)
    matrix = torch.randn(9, 7, dtype=torch.float64)
    a, b = weighted_svd(matrix, 3)
    assert torch.linalg.matrix_norm(matrix - a @ b).item() == pytest.approx(tail_norm(matrix, 3))
    scale = Scaling.diagonal(torch.ones(7))
    a2, b2 = weighted_svd(matrix, 3, torch.ones(9), scale)
    torch.testing.assert_close(a2 @ b2, a @ b)


@pytest.mark.parametrize("shape", [(40, 17), (17, 40)], ids=["tall", "wide"])
@pytest.mark.parametrize("scaling", ["whitening", "diagonal"])
def test_weighted_svd_in_small_chunks_is_the_optimum(
    shape: tuple[int, int], scaling: str, monkeypatch: pytest.MonkeyPatch
):
    """The weighted matrix is only ever built in chunks (its Gram summed, P^T U_r by row
    chunks): with chunks of a few rows and columns the factors are still optimal."""
    monkeypatch.setattr(linalg, "CHUNK_NUMBERS", 50)
    torch.manual_seed(8)
    matrix = torch.randn(*shape)
    rows = torch.rand(shape[0], dtype=torch.float64) + 0.1
    if scaling == "whitening":
        x = torch.randn(100, shape[1], dtype=torch.float64) * torch.rand(shape[1])
        cols = Scaling(whitening(x.T @ x, ridge=1e-6))
    else:
        cols = Scaling.diagonal(torch.rand(shape[1]) + 0.5)
    a, b = weighted_svd(matrix, 5, rows, cols)
    weighted = cols.apply(rows[:, None] * matrix.double())
    error = cols.apply(rows[:, None] * (matrix.double() - a.double() @ b.double()))
    assert torch.linalg.matrix_norm(error).item() == pytest.approx(tail_norm(weighted, 5), rel=1e-4)


def test_svdllm_refuses_a_stack_before_any_work_and_points_to_shared_basis():
    recipe = Recipe(method="svdllm", ratio=2, targets=["k"], group="layers")
    with pytest.raises(AecompressError, match="shared-basis"):
        plan_groups(tiny_llama(), recipe)
    make_method("shared-basis")  # the method it points to exists


def whitened_errors(matrices, approx, stats) -> list[float]:
    errors = []
    for weight, estimate, entry in zip(matrices, approx, stats, strict=True):
        x = torch.linalg.cholesky(entry.xtx).T
        errors.append(torch.linalg.matrix_norm((weight.double() - estimate) @ x.T).item())
    return errors


def test_shared_basis_refit_lowers_every_layers_output_error():
    torch.manual_seed(8)
    matrices = [torch.randn(12, 10) for _ in range(3)]
    stats = [synthetic_statistics(10, seed=i) for i in range(3)]
    stats[2].xtx = stats[2].xtx.flip(0, 1)  # a layer whose large channels are elsewhere
    pooled = fit_rank("shared-basis", matrices, 4, stats, refit=False, ridge=0.0)
    refit = fit_rank("shared-basis", matrices, 4, stats, ridge=0.0)
    before = whitened_errors(matrices, pooled, stats)
    after = whitened_errors(matrices, refit, stats)
    assert all(a <= b * (1 + 1e-9) for a, b in zip(after, before, strict=True))
    assert sum(after) < 0.99 * sum(before)


def test_shared_basis_of_one_matrix_is_svdllm():
    torch.manual_seed(9)
    weight = torch.randn(12, 10)
    stats = [synthetic_statistics(10)]
    (shared,) = fit_rank("shared-basis", [weight], 4, stats)
    (single,) = fit_rank("svdllm", [weight], 4, stats)
    torch.testing.assert_close(shared, single)
