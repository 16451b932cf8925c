"""Checks on tensors that hold no full-size temporaries."""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of `tensor` is finite. A finite sum proves it (any NaN or infinite
    entry makes the sum NaN or infinite) without torch.isfinite's full-size temporaries
    (its abs() copy: 254 MB for a 5632 x 5632 float64 X^T X); only a sum that is not finite
    (or one that overflowed) is checked entry by entry."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
