"""Stored-size accounting in bits: every stored tensor counts, and a ratio becomes a width.

The compression ratio of a group is (bits of its original matrices in the artifact's
storage dtype) / (bits stored for the group): codes, factors, decoder weights and biases,
norms, scales, positions, everything, each floating tensor at the storage dtype's width
and each integer tensor at its own. The paper's ratio, (numbers in the original
matrices) / (numbers stored), is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from aecompress.errors import AecompressError

# The artifact's floating tensors are stored in one of these (integer tensors keep theirs).
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def float_bits(storage_dtype: str) -> int:
    """Bits of one floating number stored in `storage_dtype`."""
    return 8 * STORAGE_DTYPES[storage_dtype].itemsize


def ratio_problem(ratio: float) -> str | None:
    """What is wrong with a ratio (dense size / stored size), if anything; a fraction of the
    size (0.8) is answered with the ratio meant (80% of the size is 1.25)."""
    if ratio > 1:
        return None
    hint = f"; {ratio:.0%} of the size is --ratio {1 / ratio:.3g}" if 0 < ratio < 1 else ""
    return f"must be greater than 1, the dense size over the stored size (got {ratio:g}{hint})"


def check_ratio(ratio: float) -> None:
    if problem := ratio_problem(ratio):
        raise AecompressError(f"ratio {problem}")


def stored_numel(tensors: Iterable[torch.Tensor]) -> int:
    """Numbers stored in `tensors` (each counted once, whatever its dtype)."""
    return sum(t.numel() for t in tensors)


def stored_bits(tensors: Iterable[torch.Tensor], float_bits: int) -> int:
    """Bits stored in `tensors`: floating ones at `float_bits` (the storage dtype's width,
    whatever their dtype in memory), integer ones at their own dtype's width."""
    return sum(
        t.numel() * (float_bits if t.is_floating_point() else 8 * t.element_size()) for t in tensors
    )


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
            f"{what}: the ratio is too large, even width 1 stores {cost(1)} bits "
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
