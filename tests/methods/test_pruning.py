"""Sparse methods: positions storage, magnitude pruning (and the budget it counts)."""

from __future__ import annotations

import math

import pytest
import torch

from aecompress.budget import stored_bits
from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from aecompress.methods.pruning import obs_prune, pack_bits, unpack_bits
from tests.methods.helpers import correlated_inputs, fit, output_error, spec_of


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
    method, stored, budget = fit("prune", matrices, ratio=ratio, options={"index": index})
    scheme = stored.layout.index
    assert scheme == (index if index != "auto" else "int32")
    kept = stored.width
    bits = stored_bits(stored.tensors().values(), 32)
    assert bits <= budget < bits + (32 if scheme == "bitmap" else 64)
    assert bits == 32 * kept + stored.info["position_bits"]
    assert stored.info["ratio_without_positions"] == 2 * 16 * 24 / kept
    rebuilt = torch.cat([method.reconstruct(stored, i) for i in range(2)])
    original = torch.cat(matrices)
    assert int((rebuilt != 0).sum()) == kept
    threshold = original.abs().flatten().topk(kept).values.min()
    assert torch.equal(rebuilt[rebuilt != 0], original[original.abs() >= threshold])


def test_prune_auto_prefers_the_bitmap_at_low_ratios():
    _, stored, _ = fit("prune", [torch.randn(8, 64)], ratio=1.25)
    assert stored.layout.index == "bitmap"
    assert stored.width == int(8 * 64 / 1.25) - 8 * 64 // 32


def test_obs_pruning_with_white_inputs_is_magnitude_pruning_per_block():
    weight = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    mask, values = obs_prune(weight, torch.eye(16, dtype=torch.float64), 96, block_size=8)
    assert int(mask.sum()) == 96
    for block in (slice(0, 8), slice(8, 16)):
        part = weight[:, block].abs()
        threshold = part.flatten().topk(48).values.min()
        assert torch.equal(mask[:, block], part >= threshold)
    torch.testing.assert_close(values[mask], weight[mask])


def test_obs_pruning_in_place_overwrites_only_the_statistic():
    generator = torch.Generator().manual_seed(3)
    weight, x = torch.randn(12, 16, generator=generator), torch.randn(64, 16, generator=generator)
    xtx = (x.T @ x).double()
    x[:, 5] = 0
    expected = obs_prune(weight, xtx, 100, block_size=8)
    owned = xtx.clone()
    mask, values = obs_prune(weight, owned, 100, block_size=8, overwrite=True)
    assert torch.equal(mask, expected[0])
    torch.testing.assert_close(values, expected[1])
    assert not torch.equal(owned, xtx)  # factorised where it lay


def test_sparsegpt_beats_wanda_and_magnitude_on_the_output_error():
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    x = correlated_inputs(16)
    stats = [TargetStatistics(400, x.T @ x, x.abs().mean(0))]
    errors = {}
    for name in ("prune", "wanda", "sparsegpt"):
        method, stored, _ = fit(name, [weight], ratio=1.6, statistics=stats)
        errors[name] = output_error(weight, method.reconstruct(stored, 0), x)
    assert errors["sparsegpt"] < 0.8 * errors["wanda"]
    assert errors["sparsegpt"] < 0.8 * errors["prune"]


def test_wanda_keeps_equal_counts_per_row_by_weight_times_input_norm():
    weight = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(16, seed=2)
    stats = [TargetStatistics(400, x.T @ x, None)]
    method, stored, _ = fit("wanda", [weight], ratio=1.8, statistics=stats)
    rebuilt = method.reconstruct(stored, 0)
    kept = (rebuilt != 0).sum(1)
    assert int(kept.max() - kept.min()) <= 1 and int(kept.sum()) == stored.width
    scores = weight.abs() * (x.T @ x).diagonal().sqrt().float()
    for row in range(10):
        chosen = rebuilt[row] != 0
        assert scores[row][chosen].min() >= scores[row][~chosen].max()


@pytest.mark.parametrize("name", ["prune", "wanda", "sparsegpt"])
def test_n_m_keeps_n_of_every_m_and_counts_two_bits_per_kept_weight(name):
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(32, seed=3)
    stats = [TargetStatistics(400, x.T @ x, None)]
    method, stored, _ = fit(name, [weight], ratio=1.5, options={"pattern": "2:4"}, statistics=stats)
    rebuilt = method.reconstruct(stored, 0)
    assert ((rebuilt.reshape(-1, 4) != 0).sum(1) <= 2).all()
    assert stored.width == 8 * 32 // 2
    assert stored_bits(stored.tensors().values(), 32) == 32 * (128 + math.ceil(128 * 2 / 32))
    assert method.larger(stored.width, spec_of([weight])) == []


def test_n_m_refuses_a_ratio_it_cannot_reach():
    with pytest.raises(AecompressError, match="2:4"):
        fit("prune", [torch.randn(8, 32)], ratio=2.5, options={"pattern": "2:4"})


def test_sparsegpt_quantizing_inside_its_sweep_beats_rounding_after_it():
    """Joint pruning + 3-bit quantization (each kept weight rounded to its group's grid as
    the OBS sweep reaches it, the error spread on the columns not yet visited) against
    pruning then rounding the kept values to nearest: the same width and stored bits,
    less output error."""
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(64, tokens=600, seed=3)
    stats = [TargetStatistics(600, x.T @ x, x.abs().mean(0))]
    errors, sizes = {}, set()
    for stage in ("int3:g32:gptq", "int3:g32:rtn"):
        method, stored, budget = fit(
            "sparsegpt", [weight], ratio=8, statistics=stats, quantize=stage
        )
        sizes.add((stored.width, stored_bits(stored.tensors().values(), 32)))
        errors[stage] = output_error(weight, method.reconstruct(stored, 0), x)
    assert len(sizes) == 1 and sizes.pop()[1] <= budget
    assert errors["int3:g32:gptq"] < 0.95 * errors["int3:g32:rtn"]


@pytest.mark.parametrize("name", ["prune", "wanda"])
def test_kept_values_are_rounded_to_nearest_on_their_own_grid(name: str):
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(32, seed=4)
    stats = [TargetStatistics(400, x.T @ x, x.abs().mean(0))]
    method, stored, _ = fit(name, [weight], ratio=4, statistics=stats, quantize="int8:g16")
    rebuilt, (floats, _) = (
        method.reconstruct(stored, 0),
        fit(name, [weight], width=stored.width, statistics=stats)[1:],
    )
    kept = rebuilt != 0
    step = stored.members[0]["values.scales"].repeat_interleave(16, 1)
    assert torch.equal(kept, method.reconstruct(floats, 0) != 0)
    assert ((rebuilt - weight).abs()[kept] <= 0.5 * step[kept] + 1e-6).all()
