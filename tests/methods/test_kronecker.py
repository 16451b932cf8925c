"""Kronecker: Van Loan's rearrangement, factor shapes, refinement."""

from __future__ import annotations

import math

import pytest
import torch

from aecompress.methods.kronecker import factor_shapes, kronecker_sum, rearrange
from tests.methods.helpers import fit


def test_van_loan_recovers_an_exact_sum_of_kronecker_products():
    torch.manual_seed(1)
    a, b = torch.randn(2, 4, 3), torch.randn(2, 6, 5)
    matrix = kronecker_sum(a, b)
    assert torch.allclose(matrix, torch.kron(a[0], b[0]) + torch.kron(a[1], b[1]), atol=1e-6)
    assert torch.linalg.matrix_rank(rearrange(matrix, 4, 3)) == 2
    method, stored, _ = fit(
        "kronecker",
        [matrix],
        ratio=matrix.numel() / (2 * (12 + 30)),
        options={"shape": (4, 3), "steps": 0},
    )
    assert stored.width == 2
    torch.testing.assert_close(method.reconstruct(stored, 0), matrix, atol=1e-5, rtol=0)


def test_kronecker_refinement_lowers_the_ae_loss():
    torch.manual_seed(2)
    matrices = [torch.randn(24, 16) for _ in range(2)]
    _, stored, _ = fit("kronecker", matrices, ratio=3, options={"steps": 50, "lr": 1e-2})
    assert stored.info["loss_final"] < stored.info["loss_initial"]
    assert [m["a"].shape[0] for m in stored.members] == [stored.width] * 2


def test_factor_shapes_minimise_the_cost_of_a_term():
    n1, m1 = factor_shapes(1536, 576, 1)
    cost = n1 * m1 + (1536 // n1) * (576 // m1)
    assert cost <= 2 * math.isqrt(1536 * 576) + 200
    n1s, m1s = factor_shapes(1536, 576, 30)  # stacked: A per member costs 30 times more
    assert n1s * m1s < n1 * m1


def test_an_outlier_of_1e30_gives_finite_factors():
    torch.manual_seed(3)
    matrix = torch.randn(16, 32)
    matrix[0, 0] = 1e30  # its squared norm overflows float32
    method, stored, _ = fit("kronecker", [matrix], ratio=2, options={"steps": 3})
    assert all(torch.isfinite(t).all() for t in stored.tensors().values())
    assert method.reconstruct(stored, 0)[0, 0].item() == pytest.approx(1e30, rel=1e-3)
