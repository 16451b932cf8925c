"""Feasibility probe for SliceGPT on a Llama-style model: is cutting hidden-size
directions worth building as a method here?

One orthogonal basis Q for the whole residual stream (the principal directions of the
RMS-normalised hidden states at every RMSNorm's input, on the default calibration windows:
64 x 256 WikiText-2 train tokens, seed 0) and its first d' columns P. Keeping only those
directions is simulated exactly in the dense model: the embedding output and every
attention and MLP output are projected onto span(P), so the residual stream, and every
norm and matrix reading it, lives there. This equals SliceGPT with one rotation folded
into every block (each linear layer then [out, d'] or [d', in]: ratio d / d' on all of
them) plus a d x d' projection after the embedding and before the final norm, which keeps
a tied head tied; SliceGPT's per-block rotations would add a d' x d' shortcut per residual
connection. Nothing is refitted. WikiText-2 validation and test perplexity over the first
16 windows of 512 tokens, the dense model in the same run.

    OMP_NUM_THREADS=1 python benchmarks/slicegpt_probe.py --widths 460 345 \
        --out benchmarks/results/structured/slicegpt-probe.md
"""

from __future__ import annotations

import argparse
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


def principal_directions(model: Any, windows: torch.Tensor) -> torch.Tensor:
    """Q [d, d] of a Llama-style causal LM: eigenvectors of sum n n^T over tokens and
    RMSNorm inputs, n = x / rms(x), by decreasing eigenvalue."""
    size = model.config.hidden_size
    gram = torch.zeros(size, size, dtype=torch.float64)

    def add(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, size).double()
        normalised = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        gram.add_(normalised.T @ normalised)

    layers = model.model.layers
    norms = [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    handles = [m.register_forward_pre_hook(add) for m in [*norms, model.model.norm]]
    try:
        with torch.no_grad():
            for batch in windows.split(8):
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    values, vectors = torch.linalg.eigh(gram)
    return vectors[:, values.argsort(descending=True)].float()


@contextmanager
def sliced_stream(model: Any, basis: torch.Tensor) -> Iterator[None]:
    """The model with its residual stream kept in span(basis) (module docstring)."""
    projection = basis @ basis.T

    def project(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        return output @ projection

    writers = [model.model.embed_tokens]
    writers += [
        m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)
    ]
    handles = [m.register_forward_hook(project) for m in writers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--widths", nargs="+", type=int, required=True, help="kept d'")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True, help="Markdown file")
    args = parser.parse_args()
    started = utc_now()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    assert tokenizer is not None, f"{args.model} has no tokenizer"
    basis = principal_directions(model, calibration_windows(tokenizer, CalibrationConfig()))
    splits = {
        s: window_ids(tokenizer, wikitext2_text(s), args.seq_len, args.windows)
        for s in ("validation", "test")
    }
    size = model.config.hidden_size
    rows = [
        (
            "dense",
            size,
            "1.000",
            *(f"{windows_perplexity(model, ids):.2f}" for ids in splits.values()),
        )
    ]
    for width in args.widths:
        with sliced_stream(model, basis[:, :width]):
            scores = [f"{windows_perplexity(model, ids):.2f}" for ids in splits.values()]
        rows.append((f"d' = {width}", width, f"{size / width:.3f}", *scores))
        print(rows[-1], flush=True)
    lines = [
        "# SliceGPT feasibility probe: one rotation of the residual stream, directions cut",
        "",
        *__doc__.split("\n\n")[1:2],
        "",
        *markdown_table(
            ("row", "kept d'", "ratio of each linear layer", "validation", "test"), rows
        ),
        "",
        *provenance(started),
    ]
    write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
