"""gptq and rtn through the Method interface: widths in bits, stored form, served packed."""

from __future__ import annotations

import pytest
import torch

from aecompress.budget import stored_bits
from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from aecompress.methods import FitContext, GroupSpec, make_method
from aecompress.methods.quantize import QuantScheme, dequantize, rtn
from aecompress.modules import QuantizedLinear
from tests.methods.helpers import correlated_inputs, output_error


def bf16_spec(rows: int = 64, cols: int = 576, count: int = 1) -> GroupSpec:
    return GroupSpec("g", "up", "linear", count, rows, cols, storage_dtype="bfloat16")


@pytest.mark.parametrize(
    ("ratio", "width"),
    [(16 / 4.25, (4, 64)), (16 / 3.25, (3, 64)), (16 / 4.5, (4, 32)), (16 / 4.03, (4, 0))],
)
def test_the_ratio_picks_the_most_bits_then_the_smallest_group_that_fit(ratio, width):
    """In bits against dense bf16: int4 with a bf16 scale per 64 weights is 4.25 bits a
    weight, ratio 3.76; a 576-column row has no group of 128."""
    method, spec = make_method("rtn"), bf16_spec()
    budget = spec.dense_bits / ratio * (1 + 1e-9)
    assert method.solve_width([], FitContext(spec, budget)) == width
    assert method.cost(width, spec) <= budget
    assert all(method.cost(w, spec) > budget for w in method.larger(width, spec))


def test_fixed_bits_and_group_are_kept_or_refused_when_they_do_not_fit():
    spec = bf16_spec()
    method = make_method("gptq", {"bits": 3, "group": 64})
    assert method.solve_width([], FitContext(spec, spec.dense_bits / 2)) == (3, 64)
    with pytest.raises(AecompressError, match="even 3 bits with groups of 64"):
        method.solve_width([], FitContext(spec, spec.dense_bits / 5))
    with pytest.raises(AecompressError, match="96 or 144 would"):
        make_method("rtn", {"group": 128}).check(spec)


@pytest.mark.parametrize(
    ("options", "widths"),
    [
        # every bits at the uniform width's group (64), every group at its bits (3)
        ({}, [(b, 64) for b in range(2, 9)] + [(3, 32), (3, 0)]),
        ({"group": 64}, [(b, 64) for b in range(2, 9)]),
        ({"bits": 3}, [(3, 32), (3, 64), (3, 0)]),
    ],
)
def test_allocation_tries_each_bit_width_at_its_exact_stored_bits(options, widths):
    method, spec = make_method("gptq", options), bf16_spec()
    budgets = method.allocation_budgets(spec, spec.dense_bits / (16 / 3.25))
    assert budgets == sorted(float(method.cost(w, spec)) for w in widths)
    solved = [method.solve_width([], FitContext(spec, budget)) for budget in budgets]
    assert sorted(solved, key=lambda w: method.cost(w, spec)) == sorted(
        widths, key=lambda w: method.cost(w, spec)
    )


def test_stored_form_is_packed_codes_and_storage_dtype_scales():
    weight = torch.randn(64, 576, generator=torch.Generator().manual_seed(0))
    spec = bf16_spec()
    for symmetric in (True, False):
        method = make_method("rtn", {"bits": 4, "group": 64, "symmetric": symmetric})
        context = FitContext(spec, float("inf"))
        stored = method.fit([weight], (4, 64), context)
        member = stored.members[0]
        assert member["codes"].dtype == torch.int32 and member["codes"].shape == (64, 72)
        assert ("zeros" in member) != symmetric
        assert stored_bits(stored.tensors().values(), 16) == method.cost((4, 64), spec)
        scheme = QuantScheme(4, 64, symmetric)
        expected = dequantize(rtn(weight, scheme, scale_dtype=torch.bfloat16))
        torch.testing.assert_close(method.reconstruct(stored, 0), expected)


def test_gptq_lowers_the_output_error_below_rtn_and_rounds_embeddings_to_nearest():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    x = correlated_inputs(64)
    stats = [TargetStatistics(400, x.T @ x, None)]
    spec = GroupSpec("g", "up", "linear", 1, 32, 64)
    errors = {}
    for name in ("rtn", "gptq"):
        method = make_method(name, {"bits": 3, "group": 32})
        stored = method.fit([weight], (3, 32), FitContext(spec, float("inf"), statistics=stats))
        errors[name] = output_error(weight, method.reconstruct(stored, 0), x)
    assert errors["gptq"] < 0.9 * errors["rtn"]
    embedding = GroupSpec("e", "embed", "embedding", 1, 32, 64)
    gptq, plain = make_method("gptq", {"bits": 3}), make_method("rtn", {"bits": 3})
    context = FitContext(embedding, float("inf"))  # no statistics: an embedding has no inputs
    assert torch.equal(
        gptq.reconstruct(gptq.fit([weight], (3, 32), context), 0),
        plain.reconstruct(plain.fit([weight], (3, 32), context), 0),
    )


def test_served_packed_and_computing_what_it_reconstructs():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    method = make_method("rtn", {"bits": 4, "group": 64})
    spec = GroupSpec("g", "up", "linear", 1, 64, 128, storage_dtype="bfloat16")
    stored = method.fit([weight], (4, 64), FitContext(spec, float("inf"))).as_parameters()
    module = method.linear(stored, 0, None)
    assert isinstance(module, QuantizedLinear)
    x = torch.randn(5, 128)
    with torch.no_grad():
        expected = x @ method.reconstruct(stored, 0).T
        got = module(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * scale)


def test_a_sparse_bf16_group_at_ratio_2_stores_half_the_dense_bits_bitmap_included():
    """Positions cost their true bits whatever the storage dtype (a bitmap bit is a bit,
    not 1/32 of a number)."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    method = make_method("prune", {"index": "bitmap"})
    spec = GroupSpec("g", "up", "linear", 1, 64, 128, storage_dtype="bfloat16")
    context = FitContext(spec, spec.dense_bits / 2)
    stored = method.fit([weight], method.solve_width([weight], context), context)
    assert 2 * stored_bits(stored.tensors().values(), 16) == spec.dense_bits
    assert stored.width == 64 * 128 * 7 // 16  # 16 bits a kept value, 1 bit a position
