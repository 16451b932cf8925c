"""SliceGPT with one rotation (Llama-style models): rotates the residual stream into the
principal directions of the normalised hidden states (calibration) and keeps hidden /
ratio of them, so every linear layer of the blocks, the embedding and the output head
(untied) shrink; nothing is refitted. Stores a plain smaller Llama (hidden_size d').

`slicegpt` rotates a Llama-style model's residual stream into the principal directions of
the RMS-normalised hidden states entering its RMSNorms (all of them together, on the
calibration windows: one rotation Q for the whole stream) and keeps the first d' of them,
d' = hidden / ratio rounded down to a multiple of the attention heads (transformers' Llama
config asks for it). With P = Q[:, :d'] [d, d'], s = sqrt(d / d') and each
RMSNorm's gain g folded into the matrices that read it:

  embedding                        E P               [vocab, d']
  q, k, v, up, gate (the readers)  s W diag(g) P     [out, d']
  o, down (the writers)            P^T W, bias P^T b [d', in]
  output head                      s W diag(g_final) P [vocab, d'], untied from the embedding
  every RMSNorm                    gain 1 over d', epsilon eps d / d'

so each sliced norm of y = x P equals the original norm of the projected stream x P P^T:
the model computes exactly what the original computes with its residual stream projected
onto span(P) wherever it is written (SliceGPT's only approximation; nothing is refitted).
It is a plain Llama whose hidden_size is d': smaller matrices, served and exported as
they are. The ratio counts the blocks' linear layers, which all shrink by d / d'; the
embedding shrinks too, and a tied output head becomes a [vocab, d'] matrix of its own:
the artifact's whole-model figures count both. SliceGPT as published rotates each
block's stream by its own basis and stores a d' x d' shortcut on every residual
connection, which no plain transformers model has (benchmarks/slicegpt_probe.py measures
that form).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.calibration import CalibrationConfig, calibration_windows
from aecompress.compressed import SlicedStream
from aecompress.errors import AecompressError
from aecompress.progress import progress_bar
from aecompress.targets import STREAM_FAMILIES, resolve_targets, untie_embeddings

# the families every block reads the stream with (after an RMSNorm) and writes it with
READERS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("up_proj", "gate_proj")}
WRITERS = {"self_attn": "o_proj", "mlp": "down_proj"}
NORMS = {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"}
SUPPORTED = ("llama",)  # model types whose blocks are exactly norm -> attention / MLP -> add


def check_sliceable(model: PreTrainedModel) -> None:
    """Refuse a model whose residual stream slicegpt cannot cut exactly."""
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise AecompressError(
            f"slicegpt cuts the residual stream of Llama-style models ({', '.join(SUPPORTED)}); "
            f"this model is {kind}"
        )


def sliced_width(hidden_size: int, ratio: float, multiple: int = 1) -> int:
    """d' = hidden / ratio rounded down to a multiple of `multiple` (transformers' Llama
    config wants a hidden size that its attention heads divide): the blocks' linear layers
    at no more than 1/ratio."""
    width = math.floor(hidden_size / ratio) // multiple * multiple
    if width < multiple:
        raise AecompressError(
            f"slicegpt at ratio {ratio:g} keeps no direction of the {hidden_size}-wide stream "
            f"(the width must be a multiple of {multiple}, the attention heads)"
        )
    return width


def normalised_gram(x: torch.Tensor) -> torch.Tensor:
    """sum n n^T over the tokens of x [..., d], n = x / rms(x), in float64."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    normalised = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return normalised.T @ normalised


def leading(gram: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """The eigenvectors of a Gram matrix by decreasing eigenvalue, the first `width`."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors[:, values.argsort(descending=True)[:width]]


def stream_norms(model: PreTrainedModel) -> list[nn.Module]:
    """Every RMSNorm reading the residual stream: each block's two, then the final one."""
    layers = model.model.layers
    return [getattr(layer, NORMS[part]) for layer in layers for part in NORMS] + [model.model.norm]


def stream_directions(
    model: PreTrainedModel, windows: torch.Tensor, progress: bool = True
) -> torch.Tensor:
    """Q [d, d] (float64): the principal directions of every RMSNorm's normalised input
    together, on `windows` [samples, seq_len] of token ids."""
    size = model.config.hidden_size
    gram = torch.zeros(size, size, dtype=torch.float64)

    def add(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        gram.add_(normalised_gram(args[0]).cpu())

    handles = [norm.register_forward_pre_hook(add) for norm in stream_norms(model)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in progress_bar(windows.split(8), desc="slicegpt", enabled=progress):
                model(input_ids=batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return leading(gram)


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace `module`'s weight by `weight`, in the weight's dtype."""
    dtype = cast(torch.Tensor, module.weight).dtype
    module.weight = nn.Parameter(weight.to(dtype).contiguous())


def _slice_linear(
    linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """Give `linear` its sliced weight (and a writer its sliced bias)."""
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(linear.bias.dtype))
    _set_weight(linear, weight)
    linear.out_features, linear.in_features = weight.shape


def _slice_norm(norm: nn.Module, width: int, epsilon: float) -> torch.Tensor:
    """Reset an RMSNorm to gain 1 over `width` with `epsilon`; returns its old gain."""
    gain = cast(torch.Tensor, norm.weight).detach().double()
    _set_weight(norm, torch.ones(width, device=gain.device))
    setattr(norm, "variance_epsilon", epsilon)  # noqa: B010 (LlamaRMSNorm's attribute)
    return gain


def slice_stream(model: PreTrainedModel, basis: torch.Tensor) -> None:
    """Cut the residual stream of a Llama-style `model` to span(basis) in place (module
    docstring): basis P [d, d'] with orthonormal columns."""
    check_sliceable(model)
    size, width = basis.shape
    scale = math.sqrt(size / width)
    epsilon = model.config.rms_norm_eps * size / width
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        untie_embeddings(model)
    device = next(model.parameters()).device
    basis = basis.to(device=device, dtype=torch.float64)
    with torch.no_grad():
        embed = cast(nn.Embedding, model.get_input_embeddings())
        _set_weight(embed, embed.weight.double() @ basis)
        embed.embedding_dim = width
        for layer in model.model.layers:
            for part, readers in READERS.items():
                block = getattr(layer, part)
                gain = _slice_norm(getattr(layer, NORMS[part]), width, epsilon)
                for name in readers:
                    linear = getattr(block, name)
                    folded = scale * (linear.weight.double() * gain) @ basis
                    _slice_linear(linear, folded)
                writer = getattr(block, WRITERS[part])
                bias = None if writer.bias is None else basis.T @ writer.bias.double()
                _slice_linear(writer, basis.T @ writer.weight.double(), bias)
        gain = _slice_norm(model.model.norm, width, epsilon)
        if head is not None:
            _slice_linear(head, scale * (head.weight.double() * gain) @ basis)
    model.config.hidden_size = width
    model.config.rms_norm_eps = epsilon


def stream_weights(model: PreTrainedModel) -> list[str]:
    """The names of the blocks' linear layers' weights (slicegpt's targets, STREAM_FAMILIES)."""
    return [f"{target.path}.weight" for target in resolve_targets(model, list(STREAM_FAMILIES))]


def blocks_linear_params(model: PreTrainedModel) -> int:
    """Numbers of the blocks' linear layers' weights (the targets slicegpt shrinks)."""
    return sum(model.get_parameter(name).numel() for name in stream_weights(model))


def slice_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    ratio: float,
    calibration: CalibrationConfig,
    progress: bool = True,
) -> SlicedStream:
    """Cut `model`'s residual stream in place to hidden / ratio directions fitted on the
    calibration windows; returns the figures the artifact records."""
    check_sliceable(model)
    if tokenizer is None:
        raise AecompressError(
            "slicegpt fits its rotation on calibration text: it needs a tokenizer"
        )
    size = model.config.hidden_size
    width = sliced_width(size, ratio, model.config.num_attention_heads)
    dense_params = sum(p.numel() for p in model.parameters())
    before = blocks_linear_params(model)
    directions = stream_directions(model, calibration_windows(tokenizer, calibration), progress)
    slice_stream(model, directions[:, :width])
    return SlicedStream(size, width, before, blocks_linear_params(model), dense_params)
