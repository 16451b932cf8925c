import pytest
import torch

from aecompress.budget import stored_bits
from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from aecompress.methods import make_method
from aecompress.methods.linalg import truncated_svd
from tests.methods.helpers import correlated_inputs, fit, output_error


def test_truncated_svd_is_the_eckart_young_optimum():
    torch.manual_seed(0)
    matrix = torch.randn(20, 12, dtype=torch.float64)
    a, b = truncated_svd(matrix, 4)
    singular = torch.linalg.svdvals(matrix)
    error = torch.linalg.matrix_norm(matrix - a @ b)
    assert error == pytest.approx(singular[4:].pow(2).sum().sqrt().item(), rel=1e-10)


def test_stacked_group_shares_one_basis_and_splits_codes_per_member():
    torch.manual_seed(0)
    matrices = [torch.randn(8, 6) for _ in range(3)]
    method, stored, _ = fit("svd", matrices)
    assert set(stored.shared) == {"b"} and stored.shared["b"].shape == (6, 6)
    assert [m["a"].shape for m in stored.members] == [(8, 6)] * 3
    for index, matrix in enumerate(matrices):
        torch.testing.assert_close(method.reconstruct(stored, index), matrix, atol=1e-5, rtol=0)


def test_svd_has_no_options():
    with pytest.raises(AecompressError, match="rank"):
        make_method("svd", {"rank": 3})


def test_quantized_factors_compensated_on_their_inputs_beat_rounding_them():
    """svdllm with a gptq stage (B by GPTQ under X^T X, A refitted to the quantized B and
    quantized by GPTQ under its own inputs' Gram) against an rtn stage (both factors
    rounded to nearest): the same rank and stored bits, less output error."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    x = correlated_inputs(64, tokens=600)
    stats = [TargetStatistics(600, x.T @ x, x.abs().mean(0), None, None, None)]
    errors, sizes = {}, set()
    for stage in ("int3:g16:gptq", "int3:g16:rtn"):
        method, stored, budget = fit("svdllm", [weight], ratio=4, statistics=stats, quantize=stage)
        sizes.add((stored.width, stored_bits(stored.tensors().values(), 32)))
        errors[stage] = output_error(weight, method.reconstruct(stored, 0), x)
    assert len(sizes) == 1 and sizes.pop()[1] <= budget
    assert errors["int3:g16:gptq"] < 0.85 * errors["int3:g16:rtn"]
