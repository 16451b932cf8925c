"""Helpers of the method tests: one fit through the Method interface, synthetic
calibration statistics, and a tiny Llama model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import transformers

import aecompress
from aecompress.calibration import TargetStatistics
from aecompress.methods import FitContext, GroupSpec, Method, Stored, make_method
from aecompress.methods.stage import QuantStage
from tests.conftest import tiny_model


def spec_of(
    matrices: Sequence[torch.Tensor],
    kind: Literal["linear", "embedding"] = "linear",
    family: str = "k",
    head_dim: int | None = None,
    quantize: str | None = None,
) -> GroupSpec:
    rows, cols = matrices[0].shape
    stage = None if quantize is None else QuantStage.model_validate(quantize)
    return GroupSpec("g", family, kind, len(matrices), rows, cols, head_dim, quantize=stage)


def fit(
    name: str,
    matrices: Sequence[torch.Tensor],
    *,
    ratio: float | None = None,
    width: Any = None,
    options: dict[str, Any] | None = None,
    statistics: Sequence[Any] | None = None,
    kind: Literal["linear", "embedding"] = "linear",
    family: str = "k",
    head_dim: int | None = None,
    seed: int = 0,
    validate: Callable[[list[torch.Tensor]], float] | None = None,
    quantize: str | None = None,
) -> tuple[Method, Stored, float]:
    """Fit method `name` on `matrices` at `ratio` (its solved width) or at `width`, with
    a quantization stage (e.g. 'int4:g16') if given; returns the method, what it stored,
    and the budget (bits, floats at 32)."""
    method = make_method(name, options)
    spec = spec_of(matrices, kind, family, head_dim, quantize)
    method.check(spec)
    budget = spec.dense_bits / ratio if ratio is not None else float("inf")
    if width is not None and ratio is None:
        budget = float(method.cost(width, spec))
    context = FitContext(spec, budget, seed, statistics, validate, progress=False)
    if width is None:
        width = method.solve_width(matrices, context)
    return method, method.fit(matrices, width, context), budget


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


def correlated_inputs(cols: int, tokens: int = 400, seed: int = 0) -> torch.Tensor:
    """`tokens` inputs with correlated channels of unequal scales (float64)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator, dtype=torch.float64)
    scales = torch.linspace(0.2, 3.0, cols, dtype=torch.float64)
    return torch.randn(tokens, cols, generator=generator, dtype=torch.float64) @ mixing * scales


def output_error(weight: torch.Tensor, estimate: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm((weight.double() - estimate.double()) @ x.T).item()


STRUCTURED_CALIBRATION = {"samples": 8, "seq_len": 32, "batch_size": 4}


def compress_structured(tokenizer, method: str, target: str, ratio: float = 1.5, **fields):
    """A tiny Llama whose `target` blocks (ffn or attn) `method` compressed, float32 storage."""
    return aecompress.compress(
        tiny_llama(),
        tokenizer=tokenizer,
        method=method,
        ratio=ratio,
        targets=[target],
        calibration=STRUCTURED_CALIBRATION,
        storage_dtype="float32",
        progress=False,
        **fields,
    )
