import pytest
import torch

from aecompress.numerics import all_finite


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_any_non_finite_entry_is_found(dtype, bad):
    tensor = torch.randn(50, 40).to(dtype)
    assert all_finite(tensor)
    tensor[7, 3] = bad
    assert not all_finite(tensor)


def test_finite_entries_whose_sum_overflows_are_finite():
    assert all_finite(torch.tensor([60000.0, 60000.0], dtype=torch.float16))
    assert all_finite(torch.full((4,), 3e38))


def test_integer_tensors_are_finite():
    assert all_finite(torch.arange(5))
