"""Tucker: dims per head, greedy ranks within the budget, refinement."""

from __future__ import annotations

import math

import pytest
import torch

from aecompress.errors import AecompressError
from aecompress.methods.tucker import tensor_dims, tucker_cost, tucker_ranks, tucker_to_tensor
from tests.methods.helpers import fit


def test_tucker_dims_follow_heads():
    assert tensor_dims(3, 16, 32, "rows", 8, "k") == [3, 2, 8, 32]
    assert tensor_dims(1, 32, 16, "cols", 8, "o") == [32, 2, 8]
    assert tensor_dims(2, 64, 32, "none", 8, "up") == [2, 64, 32]
    with pytest.raises(AecompressError, match="heads of 7"):
        tensor_dims(1, 16, 32, "rows", 7, "k")


def test_tucker_ranks_fit_the_budget_tightly():
    torch.manual_seed(3)
    dims = [4, 6, 8, 20]
    spectra = [torch.rand(d).sort(descending=True).values for d in dims]
    budget = 0.3 * math.prod(dims)
    ranks = tucker_ranks(dims, spectra, budget, "k")
    assert tucker_cost(dims, ranks) <= budget
    for mode in range(len(dims)):
        grown = [r + (j == mode) for j, r in enumerate(ranks)]
        assert (
            grown[mode] > dims[mode]
            or tucker_cost(dims, grown) > budget
            or (grown[mode] ** 2 > math.prod(grown))
        )


@pytest.mark.parametrize("tail", ["rows", "cols"])  # which mode's spectrum decays faster
def test_tucker_of_a_single_matrix_is_an_svd_of_the_budgeted_rank(tail):
    dims = [3000, 64]  # an embedding-like matrix: two modes, so the ranks must be equal
    spectra = [torch.linspace(1, 0.5, d) for d in dims]
    spectra[0 if tail == "rows" else 1] = spectra[0 if tail == "rows" else 1] ** 4
    budget = math.prod(dims) / 3
    rank = max(r for r in range(1, 65) if r * r + r * sum(dims) <= budget)
    assert tucker_ranks(dims, spectra, budget, "embed") == [rank, rank]


def test_tucker_recovers_a_low_rank_tensor():
    torch.manual_seed(4)
    core = torch.randn(2, 2, 3, 4)
    dims = [3, 4, 8, 16]
    factors = [torch.linalg.qr(torch.randn(d, r)).Q for d, r in zip(dims, core.shape, strict=True)]
    tensor = tucker_to_tensor(core, factors)  # [layers 3, heads 4, head_dim 8, in 16]
    matrices = list(tensor.reshape(3, 32, 16))
    method, stored, _ = fit("tucker", matrices, ratio=1 / 0.6, options={"steps": 0}, head_dim=8)
    assert stored.layout.dims == [3, 4, 8, 16]
    for index, matrix in enumerate(matrices):
        torch.testing.assert_close(method.reconstruct(stored, index), matrix, atol=1e-4, rtol=0)


def test_tucker_refinement_lowers_the_ae_loss():
    torch.manual_seed(5)
    options = {"steps": 40, "lr": 1e-2}
    _, stored, _ = fit("tucker", [torch.randn(24, 16)], ratio=2, options=options, family="up")
    assert stored.info["loss_final"] < stored.info["loss_initial"]


def test_tucker_refuses_a_ratio_too_large():
    with pytest.raises(AecompressError, match="too large"):
        fit("tucker", [torch.randn(8, 8)], ratio=6.4, options={"steps": 0}, family="up")
