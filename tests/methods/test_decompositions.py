"""Pruning, Kronecker and Tucker: their maths and their bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from aecompress.errors import AecompressError
from aecompress.methods import FitContext, make_method
from aecompress.methods.kronecker import factor_shapes, kronecker_sum, rearrange
from aecompress.methods.pruning import pack_bits, unpack_bits
from aecompress.methods.tucker import tensor_dims, tucker_cost, tucker_ranks, tucker_to_tensor


def stored_numel(stored) -> int:
    return sum(t.numel() for t in stored.tensors().values())


@pytest.mark.parametrize("size", [1, 31, 32, 33, 100])
def test_bitmap_round_trip(size: int):
    mask = torch.rand(size, generator=torch.Generator().manual_seed(size)) > 0.5
    words = pack_bits(mask)
    assert words.dtype == torch.int32 and words.numel() == math.ceil(size / 32)
    assert torch.equal(unpack_bits(words, size), mask)


@pytest.mark.parametrize(("index", "ratio"), [("bitmap", 1.5), ("int32", 1.5), ("auto", 20)])
def test_prune_keeps_the_largest_magnitudes_and_counts_positions(index: str, ratio: float):
    torch.manual_seed(0)
    matrices = [torch.randn(16, 24) for _ in range(2)]
    budget = 2 * 16 * 24 / ratio
    method = make_method("prune", {"index": index})
    stored = method.fit(matrices, budget, FitContext("up"))
    scheme = stored.meta["index"]
    assert scheme == (index if index != "auto" else "int32")
    kept = stored.meta["kept"]
    assert stored_numel(stored) <= budget < stored_numel(stored) + (1 if scheme == "bitmap" else 2)
    assert stored_numel(stored) == kept + stored.meta["index_numbers"]
    assert stored.meta["stored_without_index"] == kept
    rebuilt = torch.cat([method.reconstruct(stored, i) for i in range(2)])
    original = torch.cat(matrices)
    assert int((rebuilt != 0).sum()) == kept
    threshold = original.abs().flatten().topk(kept).values.min()
    assert torch.equal(rebuilt[rebuilt != 0], original[original.abs() >= threshold])


def test_prune_auto_prefers_the_bitmap_at_low_ratios():
    stored = make_method("prune").fit([torch.randn(8, 64)], 8 * 64 / 1.25, FitContext("up"))
    assert stored.meta["index"] == "bitmap"
    assert stored.meta["kept"] == int(8 * 64 / 1.25) - 8 * 64 // 32


def test_van_loan_recovers_an_exact_sum_of_kronecker_products():
    torch.manual_seed(1)
    a, b = torch.randn(2, 4, 3), torch.randn(2, 6, 5)
    matrix = kronecker_sum(a, b)
    assert torch.allclose(matrix, torch.kron(a[0], b[0]) + torch.kron(a[1], b[1]), atol=1e-6)
    assert torch.linalg.matrix_rank(rearrange(matrix, 4, 3)) == 2
    method = make_method("kronecker", {"shape": (4, 3), "steps": 0})
    stored = method.fit([matrix], 2 * (12 + 30), FitContext("up"))
    assert stored.meta["terms"] == 2
    torch.testing.assert_close(method.reconstruct(stored, 0), matrix, atol=1e-5, rtol=0)


def test_kronecker_refinement_lowers_the_ae_loss():
    torch.manual_seed(2)
    matrices = [torch.randn(24, 16) for _ in range(2)]
    method = make_method("kronecker", {"steps": 50, "lr": 1e-2})
    stored = method.fit(matrices, 2 * 24 * 16 / 3, FitContext("up"))
    assert stored.meta["loss_final"] < stored.meta["loss_initial"]
    assert [m["a"].shape[0] for m in stored.members] == [stored.meta["terms"]] * 2


def test_factor_shapes_minimise_the_cost_of_a_term():
    n1, m1 = factor_shapes(1536, 576, 1)
    cost = n1 * m1 + (1536 // n1) * (576 // m1)
    assert cost <= 2 * math.isqrt(1536 * 576) + 200
    n1s, m1s = factor_shapes(1536, 576, 30)  # stacked: A per member costs 30 times more
    assert n1s * m1s < n1 * m1


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
    method = make_method("tucker", {"head_dim": 8, "steps": 0})
    stored = method.fit(matrices, 0.6 * 3 * 32 * 16, FitContext("k"))
    assert stored.meta["dims"] == [3, 4, 8, 16]
    for index, matrix in enumerate(matrices):
        torch.testing.assert_close(method.reconstruct(stored, index), matrix, atol=1e-4, rtol=0)


def test_tucker_refinement_lowers_the_ae_loss():
    torch.manual_seed(5)
    method = make_method("tucker", {"steps": 40, "lr": 1e-2})
    stored = method.fit([torch.randn(24, 16)], 24 * 16 / 2, FitContext("up"))
    assert stored.meta["loss_final"] < stored.meta["loss_initial"]


def test_tucker_refuses_a_ratio_too_large():
    with pytest.raises(AecompressError, match="too large"):
        make_method("tucker", {"steps": 0}).fit([torch.randn(8, 8)], 10, FitContext("up"))
