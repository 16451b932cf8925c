"""Feasibility probe for SliceGPT on a Llama-style model: is cutting hidden-size
directions worth building as a method here?

SliceGPT rotates the residual stream into its principal directions (of the RMS-normalised
hidden states, on the default calibration windows: 64 x 256 WikiText-2 train tokens, seed
0) and keeps the first d' of them, so every linear layer reading or writing the stream
becomes [out, d'] or [d', in]. Both of its forms are simulated exactly in the dense model,
by projecting the residual stream onto the kept directions P wherever it is written (after
the embedding and after each attention and MLP residual add), so every norm and matrix
reading it lives there:
- one rotation: one P for the whole stream, fitted on every RMSNorm's input, as the
  `slicegpt` method (aecompress.pipeline.slicing) fits it. Nothing is stored beyond the
  sliced matrices (plus a d x d' projection after the embedding and before the final
  norm, which keeps a tied head tied; the method unties the head instead, so that its
  artifact is a plain config with hidden size d').
- per block (SliceGPT as published): each residual point its own P, fitted in order on
  the stream of the model already sliced before it. Each of the 2L residual connections
  then stores a d' x d' shortcut (the change of basis between its two points), counted
  in the size: d' solves d' S + 2L d'^2 = d S / ratio, S the blocks' linear layers'
  numbers per stream dimension. Not a plain model: transformers has no shortcut matrix.
Ratios are over the blocks' linear layers (embedding and head not counted), as the
every-linear-layer rows of the structured benchmark. Nothing is refitted. WikiText-2
validation and test perplexity over the first 16 windows of 512 tokens, the dense model
in the same run.

    OMP_NUM_THREADS=1 python benchmarks/slicegpt_probe.py --ratios 1.25 1.67 \
        --out benchmarks/results/structured/slicegpt-probe.md
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from common import markdown_table, provenance, utc_now, write_text
from torch import nn

from aecompress.calibration import CalibrationConfig, calibration_windows
from aecompress.data import wikitext2_text
from aecompress.evaluation.perplexity import window_ids, windows_perplexity
from aecompress.models import load_model
from aecompress.pipeline.slicing import leading, normalised_gram, stream_directions


def residual_points(model: Any) -> int:
    """Where the residual stream is written: after the embedding and after each residual
    add of each block (1 + 2L)."""
    return 1 + 2 * len(model.model.layers)


@contextmanager
def sliced_stream(model: Any, bases: list[torch.Tensor], fit: int | None = None) -> Iterator[None]:
    """The model with its residual stream kept, at each residual point i, in span(bases[i]).
    With `fit` = d', `bases` starts empty and each point's basis is fitted on the stream
    reaching it (one forward pass of all calibration windows in one batch)."""
    state: dict[str, torch.Tensor] = {}
    point = itertools.cycle(range(residual_points(model)))

    def project(stream: torch.Tensor) -> torch.Tensor:
        i = next(point)
        if fit is not None:
            bases.append(leading(normalised_gram(stream), fit).float())
        return stream @ (bases[i] @ bases[i].T)

    def embedded(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        return project(output)

    def keep_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        state["x"] = args[0]

    def attended(_module: nn.Module, _args: object, output: tuple) -> tuple:
        state["h"] = project(state["x"] + output[0])
        return (state["h"] - state["x"], *output[1:])

    def mixed(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        return project(state["h"] + output) - state["h"]

    handles = [model.model.embed_tokens.register_forward_hook(embedded)]
    for layer in model.model.layers:
        handles += [
            layer.input_layernorm.register_forward_pre_hook(keep_input),
            layer.self_attn.register_forward_hook(attended),
            layer.mlp.register_forward_hook(mixed),
        ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def per_block_directions(model: Any, windows: torch.Tensor, width: int) -> list[torch.Tensor]:
    """SliceGPT's bases: at each residual point the first `width` principal directions of
    the stream of the model sliced before it."""
    bases: list[torch.Tensor] = []
    with sliced_stream(model, bases, fit=width), torch.no_grad():
        model(input_ids=windows)
    return bases


def stream_numbers(model: Any) -> int:
    """S: the blocks' linear layers' numbers per dimension of the residual stream."""
    size = model.config.hidden_size
    total = 0
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                total += module.weight.numel() // size
    return total


def per_block_width(size: int, numbers: int, layers: int, ratio: float) -> int:
    """The largest d' with d' S + 2L d'^2 <= d S / ratio (S = numbers)."""
    budget = size * numbers / ratio
    width = int((-numbers + math.sqrt(numbers**2 + 8 * layers * budget)) / (4 * layers))
    return min(width, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", nargs="+", type=float, required=True)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True, help="Markdown file")
    args = parser.parse_args()
    started = utc_now()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    assert tokenizer is not None, f"{args.model} has no tokenizer"
    windows = calibration_windows(tokenizer, CalibrationConfig())
    splits = {
        s: window_ids(tokenizer, wikitext2_text(s), args.seq_len, args.windows)
        for s in ("validation", "test")
    }
    size, layers = model.config.hidden_size, len(model.model.layers)
    numbers, points = stream_numbers(model), residual_points(model)

    def scores() -> list[str]:
        return [f"{windows_perplexity(model, ids):.2f}" for ids in splits.values()]

    rows = [("dense", size, "1.000", *scores())]
    rotation = stream_directions(model, windows, progress=False).float()
    for ratio in args.ratios:
        width = round(size / ratio)
        with sliced_stream(model, [rotation[:, :width]] * points):
            rows.append((f"one rotation, {ratio}", width, f"{size / width:.3f}", *scores()))
        print(rows[-1], flush=True)
        width = per_block_width(size, numbers, layers, ratio)
        bases = per_block_directions(model, windows, width)
        stored = width * numbers + 2 * layers * width**2
        with sliced_stream(model, bases):
            rows.append((f"per block, {ratio}", width, f"{size * numbers / stored:.3f}", *scores()))
        print(rows[-1], flush=True)
    lines = [
        "# SliceGPT feasibility probe: the residual stream rotated, directions cut",
        "",
        *__doc__.split("\n\n")[1:2],
        "",
        *markdown_table(("row", "kept d'", "ratio", "validation", "test"), rows),
        "",
        *provenance(started),
    ]
    write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
