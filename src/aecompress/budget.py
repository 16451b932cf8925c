"""Stored-size accounting: every stored number counts, and a ratio becomes a width.

The compression ratio of a group is (numbers in the original matrices) / (numbers stored
for the group): codes, factors, decoder weights and biases, norms, indices, everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from aecompress.errors import AecompressError


def check_ratio(ratio: float) -> None:
    if not ratio > 1:
        raise AecompressError(f"ratio must be greater than 1 (got {ratio})")


def stored_numel(tensors: Iterable[torch.Tensor]) -> int:
    """Numbers stored in `tensors` (each counted once, whatever its dtype)."""
    return sum(t.numel() for t in tensors)


def stored_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def solve_width(
    cost: Callable[[int], int], budget: float, upper: int, what: str, hint: str = ""
) -> int:
    """The largest width x in [1, upper] with cost(x) <= budget (cost must not decrease).

    `what` names the group in the error raised when not even x = 1 fits, `hint` (if any)
    ends it with what would fit.
    """
    if cost(1) > budget:
        raise AecompressError(
            f"{what}: the ratio is too large, even width 1 stores {cost(1)} numbers "
            f"against a budget of {int(budget)}" + (f"; {hint}" if hint else "")
        )
    low, high = 1, upper
    while low < high:  # invariant: cost(low) <= budget
        mid = (low + high + 1) // 2
        if cost(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low
