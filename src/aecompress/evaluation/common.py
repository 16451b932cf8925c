"""Helpers shared by the evaluation tasks: length-bucketed batches, padding, pooling, and the
forward pass that turns batches of inputs into logits (in memory, or streamed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from aecompress.errors import AecompressError

POOLING_MODES = ("mean", "cls", "max")

# The model's keyword inputs of one batch (input_ids, attention_mask, ...).
Batch = dict[str, Any]
# The logits of each batch, in order: the model run on each in turn, or streamed block by
# block (evaluation/streamed.py).
Forward = Callable[[Sequence[Batch]], Iterator[torch.Tensor]]


def model_logits(model: nn.Module) -> Forward:
    """The in-memory forward: the whole model run on each batch in turn."""

    def forward(batches: Sequence[Batch]) -> Iterator[torch.Tensor]:
        for batch in batches:
            yield model(**batch).logits

    return forward


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (little padding)."""
    if batch_size < 1:
        raise AecompressError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def pad(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer sequences with `value` into a [batch, longest] long tensor."""
    out = torch.full((len(sequences), max(map(len, sequences))), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and their attention mask (on `device`, default the CPU)."""
    ids, mask = pad(sequences, pad_id), pad([[1] * len(s) for s in sequences], 0)
    return ids.to(device), mask.to(device)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else 0 (padded positions are always masked out)."""
    pad_id = tokenizer.pad_token_id
    return pad_id if isinstance(pad_id, int) else 0


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool [batch, length, dim] hidden states over the unmasked positions."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).amax(dim=1)
    if mode == "mean":
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    raise AecompressError(f"unknown pooling '{mode}' (use one of {', '.join(POOLING_MODES)})")
