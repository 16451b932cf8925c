"""Sparse + low-rank: the budget split, the alternation, and its advantage on its own kind
of matrix."""

from __future__ import annotations

import pytest
import torch

from aecompress.budget import stored_bits
from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from tests.methods.helpers import correlated_inputs, fit, output_error, spec_of


def low_rank_plus_spikes(rows: int = 64, cols: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, 3, generator=generator) @ torch.randn(3, cols, generator=generator)
    spikes = torch.zeros(rows * cols)
    spikes[torch.randperm(rows * cols, generator=generator)[:60]] = 8.0
    return low + spikes.view(rows, cols) + 0.05 * torch.randn(rows, cols, generator=generator)


@pytest.mark.parametrize("lowrank", ["svdllm", "ae-data"])
def test_sparse_plus_low_rank_beats_either_part_alone(lowrank):
    weight = low_rank_plus_spikes()
    x = correlated_inputs(48)
    stats = [TargetStatistics(400, x.T @ x, x.abs().mean(0))]
    options: dict = {"lowrank": lowrank, "share": 0.5}
    if lowrank == "ae-data":
        options["lowrank_options"] = {"epochs": 2, "decoder": []}
    errors = {}
    for name, opts in (("sparse-lowrank", options), ("svdllm", {}), ("sparsegpt", {})):
        method, stored, _ = fit(name, [weight], ratio=4, options=opts, statistics=stats)
        errors[name] = output_error(weight, method.reconstruct(stored, 0), x)
    assert errors["sparse-lowrank"] < 0.5 * min(errors["svdllm"], errors["sparsegpt"])


def test_the_low_rank_part_gets_its_share_and_the_sparse_part_the_rest():
    weight = low_rank_plus_spikes()
    x = correlated_inputs(48)
    stats = [TargetStatistics(400, x.T @ x, None)]
    method, stored, budget = fit(
        "sparse-lowrank", [weight], ratio=2, options={"share": 0.4}, statistics=stats
    )
    rank, kept = stored.width
    assert 32 * rank * (64 + 48) <= 0.4 * budget < 32 * (rank + 1) * (64 + 48)
    assert stored_bits(stored.tensors().values(), 32) == method.cost(
        (rank, kept), method_spec(weight)
    )
    assert method.cost((rank, kept + 1), method_spec(weight)) > budget


def method_spec(weight):
    return spec_of([weight])


def test_a_stack_is_refused():
    with pytest.raises(AecompressError, match="group none"):
        fit("sparse-lowrank", [torch.randn(8, 8)] * 2, ratio=2)
    with pytest.raises(AecompressError, match="embeddings"):
        fit("sparse-lowrank", [torch.randn(8, 8)], ratio=2, kind="embedding")


@pytest.mark.parametrize(
    ("lowrank", "factors"),
    [
        ("svdllm", {"0.lowrank.a.codes", "shared.lowrank.b.codes"}),
        ("ae-data", {"0.lowrank.codes.codes", "shared.lowrank.w0t.codes"}),
    ],
)
def test_both_parts_are_quantized_within_the_budget(lowrank: str, factors: set[str]):
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    x = correlated_inputs(128, seed=5)
    stats = [TargetStatistics(400, x.T @ x, x.abs().mean(0), None, None, None)]
    stage = "int4:g16"
    options = {"lowrank": lowrank, "lowrank_options": {"epochs": 2} if lowrank == "ae-data" else {}}
    method, stored, budget = fit(
        "sparse-lowrank", [weight], ratio=4, options=options, statistics=stats, quantize=stage
    )
    cost = method.cost(stored.width, spec_of([weight], quantize=stage))
    assert stored_bits(stored.tensors().values(), 32) == cost <= budget
    codes = {k for k, t in stored.tensors().items() if t.dtype == torch.int32}
    assert factors | {"0.values.codes"} <= codes
    error = output_error(weight, method.reconstruct(stored, 0), x)
    assert error < 0.5 * output_error(weight, torch.zeros_like(weight), x)
