import pytest
import torch

from aecompress.budget import check_ratio, solve_width, stored_bits
from aecompress.errors import AecompressError
from aecompress.methods import FitContext, GroupSpec, make_method


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize(
    "count,rows,cols,ratio", [(1, 1536, 576, 1.25), (30, 64, 576, 3), (1, 30522, 384, 10)]
)
def test_rank_is_the_largest_that_fits(count, rows, cols, ratio, bits):
    """A float-only method keeps the same rank in any storage dtype: dense and stored
    numbers have the same width."""
    budget = count * rows * cols * bits / ratio
    dtype = {16: "bfloat16", 32: "float32"}[bits]
    spec = GroupSpec("g", "k", "linear", count, rows, cols, storage_dtype=dtype)
    rank = make_method("svd").solve_width([], FitContext(spec, budget))
    numbers = count * rows * cols / ratio
    assert count * rows * rank + rank * cols <= numbers
    assert count * rows * (rank + 1) + (rank + 1) * cols > numbers


def test_stored_bits_count_floats_at_the_storage_width_and_integers_at_their_own():
    tensors = [
        torch.zeros(3, 4),
        torch.zeros(5, dtype=torch.bfloat16),
        torch.zeros(2, dtype=torch.int32),
    ]
    assert stored_bits(tensors, 16) == 17 * 16 + 2 * 32
    assert stored_bits(tensors, 32) == 17 * 32 + 2 * 32
    assert stored_bits([torch.zeros(7, dtype=torch.uint8)], 16) == 56


def test_solve_width_quadratic_cost_is_tight():
    cost = lambda x: 10 * x * x + 1000 * x  # noqa: E731
    width = solve_width(cost, 1e6, 10_000, "g")
    assert cost(width) <= 1e6 < cost(width + 1)


def test_ratio_checks():
    with pytest.raises(AecompressError, match="greater than 1"):
        check_ratio(1.0)
    with pytest.raises(AecompressError, match="ratio is too large"):
        solve_width(lambda x: 100 * x, 50, 10, "k.0")
