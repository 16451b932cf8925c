import pytest
import torch

from aecompress.errors import AecompressError
from aecompress.methods import make_method
from aecompress.methods.linalg import truncated_svd
from tests.methods.helpers import fit


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
