"""Sparse methods: positions storage, magnitude pruning (and the budget it counts)."""

from __future__ import annotations

import math

import pytest
import torch

from aecompress.methods.pruning import pack_bits, unpack_bits
from tests.methods.helpers import fit


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
    method, stored, budget = fit("prune", matrices, ratio=ratio, options={"index": index})
    scheme = stored.layout.index
    assert scheme == (index if index != "auto" else "int32")
    kept = stored.width
    assert stored_numel(stored) <= budget < stored_numel(stored) + (1 if scheme == "bitmap" else 2)
    assert stored_numel(stored) == kept + stored.info["position_numbers"]
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

