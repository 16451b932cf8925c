import pytest

from aecompress.budget import check_ratio, solve_width
from aecompress.errors import AecompressError
from aecompress.methods import FitContext, GroupSpec, make_method


@pytest.mark.parametrize(
    "count,rows,cols,ratio", [(1, 1536, 576, 1.25), (30, 64, 576, 3), (1, 30522, 384, 10)]
)
def test_rank_is_the_largest_that_fits(count, rows, cols, ratio):
    budget = count * rows * cols / ratio
    spec = GroupSpec("g", "k", "linear", count, rows, cols)
    rank = make_method("svd").solve_width([], FitContext(spec, budget))
    assert count * rows * rank + rank * cols <= budget
    assert count * rows * (rank + 1) + (rank + 1) * cols > budget


def test_solve_width_quadratic_cost_is_tight():
    cost = lambda x: 10 * x * x + 1000 * x  # noqa: E731
    width = solve_width(cost, 1e6, 10_000, "g")
    assert cost(width) <= 1e6 < cost(width + 1)


def test_ratio_checks():
    with pytest.raises(AecompressError, match="greater than 1"):
        check_ratio(1.0)
    with pytest.raises(AecompressError, match="ratio is too large"):
        solve_width(lambda x: 100 * x, 50, 10, "k.0")
