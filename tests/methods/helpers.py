"""Helpers of the method tests: synthetic calibration statistics and a tiny Llama model."""

from __future__ import annotations

import torch
import transformers

from aecompress.calibration import TargetStatistics
from tests.conftest import tiny_model


def synthetic_statistics(
    cols: int, tokens: int = 200, seed: int = 0, rows: int | None = None
) -> TargetStatistics:
    """Statistics of `tokens` random inputs with unequal channel scales (and a Fisher)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=generator, dtype=torch.float64)
    x = x * torch.linspace(0.1, 3.0, cols, dtype=torch.float64)
    fisher = None
    if rows is not None:
        fisher = torch.rand(rows, cols, generator=generator, dtype=torch.float64)
    return TargetStatistics(tokens, x.T @ x, x.abs().mean(0), None, fisher, None)


def embedding_statistics(vocab: int, seed: int = 0) -> TargetStatistics:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (vocab,), generator=generator).double()
    fisher = torch.rand(vocab, 8, generator=generator, dtype=torch.float64)
    return TargetStatistics(int(counts.sum()), None, None, counts, fisher, None)


def tiny_llama(seed: int = 0) -> transformers.PreTrainedModel:
    """Llama with GQA, tied embeddings, head_dim 8: every family, in a fraction of a second."""
    return tiny_model("llama", seed)
