"""Runtime replacements for compressed modules (all keep the replaced module's interface).

Each replacement lists in `stored_names` the parameters that belong to its compressed
group (they are saved once, under the group's prefix); everything else it holds, such as
the original bias, is an ordinary parameter of the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class LowRankLinear(nn.Module):
    """y = x (A B)^T + bias, as two small matmuls. Stores A [out, r] and B [r, in]."""

    stored_names: ClassVar[tuple[str, ...]] = ("a", "b")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.a, self.b, self.bias = a, b, bias
        self.in_features, self.out_features = b.shape[1], a.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.b), self.a, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [out, in] this module computes with (built on demand)."""
        return self.a @ self.b

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.a.shape[1]}"


class LowRankEmbedding(nn.Module):
    """Row lookup in A [vocab, r] followed by B [r, dim]: the embedding table is A B."""

    stored_names: ClassVar[tuple[str, ...]] = ("a", "b")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, padding_idx: int | None) -> None:
        super().__init__()
        self.a, self.b, self.padding_idx = a, b, padding_idx
        self.num_embeddings, self.embedding_dim = a.shape[0], b.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.a, self.padding_idx) @ self.b

    @property
    def weight(self) -> torch.Tensor:
        return self.a @ self.b

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.a.shape[1]}"


class FusedLinear(nn.Module):
    """A fused projection (GPT-2's c_attn: q, k, v) as parts whose outputs are concatenated."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    @classmethod
    def split(cls, weight: torch.Tensor, bias: torch.Tensor | None, count: int) -> FusedLinear:
        """Split a dense [out, in] weight (and bias) into `count` equal nn.Linear parts."""
        out_features, in_features = weight.shape
        rows = out_features // count
        parts = []
        for index in range(count):
            part = nn.Linear(in_features, rows, bias=bias is not None)
            span = slice(index * rows, (index + 1) * rows)
            part.weight = nn.Parameter(weight[span].detach().clone())
            if bias is not None:
                part.bias = nn.Parameter(bias[span].detach().clone())
            parts.append(part)
        return cls(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused [out, in] weight and bias that the parts compute together."""
        parts = [cast(nn.Linear, part) for part in self.parts]
        weight = torch.cat([part.weight for part in parts])
        biases = tuple(part.bias for part in parts)
        return weight, None if biases[0] is None else torch.cat(biases)


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` [out, in] (a decoded matrix) and the original bias."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return linear


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, kind: str) -> nn.Module:
    """The base model's own module for a dense [out, in] weight: nn.Linear, or GPT-2's
    Conv1D ([in, out] layout) when `kind` is "conv1d"."""
    if kind != "conv1d":
        return dense_linear(weight, bias)
    conv = Conv1D(weight.shape[0], weight.shape[1])
    conv.weight = nn.Parameter(weight.detach().T.contiguous())
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone())
    return conv


def dense_embedding(weight: torch.Tensor, padding_idx: int | None) -> nn.Embedding:
    return nn.Embedding.from_pretrained(
        weight.detach().clone(), freeze=False, padding_idx=padding_idx
    )


# Activations a decoder may use, by the name recorded in an artifact's metadata.
DECODER_ACTIVATIONS = ("leaky_relu", "relu", "gelu", "silu", "tanh")
DECODER_OUTPUTS = ("tanh", "none")


@dataclass(frozen=True)
class DecoderSpec:
    """How a decoder's layers are joined: the activation between layers (LeakyReLU takes
    `negative_slope`), the activation after the last layer, and norm enforcement.

    A decoder with one layer is linear: it applies no activation at all.
    """

    activation: str = "leaky_relu"
    negative_slope: float = 0.01
    output: str = "tanh"
    norm: bool = True

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, self.negative_slope)
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "gelu":
            return F.gelu(x)
        if self.activation == "silu":
            return F.silu(x)
        if self.activation == "tanh":
            return torch.tanh(x)
        raise ValueError(f"unknown activation '{self.activation}'")

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) if self.output == "tanh" else x


def decoder_layers(
    decoder: Mapping[str, torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The (weight [out, in], bias or None) pairs of a decoder stored as w0, b0, w1, b1, ..."""
    count = sum(1 for name in decoder if name.startswith("w") and name[1:].isdigit())
    return [(decoder[f"w{i}"], decoder.get(f"b{i}")) for i in range(count)]


def decode_rows(
    codes: torch.Tensor,
    decoder: Mapping[str, torch.Tensor],
    spec: DecoderSpec,
    norms: torch.Tensor | None,
) -> torch.Tensor:
    """Rows [n, m] decoded from codes [n, x] by the decoder's layers w0, b0, w1, b1, ...

    A decoder with a `skip` weight [m, x] adds the linear path codes @ skip^T to the
    layers' output. With `norms` (norm enforcement) each decoded row is rescaled to its
    stored L2 norm.
    """
    layers = decoder_layers(decoder)
    out = codes
    for index, (weight, bias) in enumerate(layers):
        out = F.linear(out, weight, bias)
        if len(layers) > 1:
            out = spec.hidden(out) if index < len(layers) - 1 else spec.final(out)
    if "skip" in decoder:
        out = out + F.linear(codes, decoder["skip"])
    if norms is not None:
        out = out * (norms / out.norm(dim=1).clamp_min(1e-12)).unsqueeze(1)
    return out


class _Decoded(nn.Module):
    """Shared decoder tensors + this member's codes (and row norms), as parameters.

    The decoder tensors are the group's shared parameters (one set for all members), so
    fine-tuning updates the one decoder that is saved.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        decoder: Mapping[str, torch.Tensor],
        spec: DecoderSpec,
        norms: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.codes, self.norms, self.spec = codes, norms, spec
        self.decoder_names = tuple(decoder)
        for name, tensor in decoder.items():
            setattr(self, name, tensor)
        optional = ["norms"] if norms is not None else []
        self.stored_names: tuple[str, ...] = ("codes", *decoder, *optional)

    def decoder(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.decoder_names}

    def decode(self, codes: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        return decode_rows(codes, self.decoder(), self.spec, norms)

    @property
    def weight(self) -> torch.Tensor:
        """The dense matrix [rows, cols] this module computes with (decoded on demand)."""
        return self.decode(self.codes, self.norms)

    def widths(self) -> list[int]:
        return [self.codes.shape[1]] + [w.shape[0] for w, _ in decoder_layers(self.decoder())]


class DecodedLinear(_Decoded):
    """y = x W^T + bias with W decoded from the codes on every forward pass."""

    def __init__(
        self,
        codes: torch.Tensor,
        decoder: Mapping[str, torch.Tensor],
        spec: DecoderSpec,
        norms: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__(codes, decoder, spec, norms)
        self.bias = bias
        self.out_features, self.in_features = codes.shape[0], self.widths()[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, decoder={self.widths()}"


class DecodedEmbedding(_Decoded):
    """Embedding lookup that decodes only the rows asked for (codes -> decoder -> norms)."""

    def __init__(
        self,
        codes: torch.Tensor,
        decoder: Mapping[str, torch.Tensor],
        spec: DecoderSpec,
        norms: torch.Tensor | None,
        padding_idx: int | None,
    ) -> None:
        super().__init__(codes, decoder, spec, norms)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = codes.shape[0], self.widths()[-1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        norms = None if self.norms is None else self.norms[flat]
        rows = self.decode(self.codes[flat], norms)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, decoder={self.widths()}"


# --- integer-quantized weights, held packed ------------------------------------------------


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The uint8 codes [rows, cols] that compressed-tensors' dense `pack-quantized` int32
    words [rows, ceil(cols * bits / 32)] hold (methods.quantize.pack: code j at bits
    j*bits.. of its row's little-endian bit stream), on their device. Eight codes fill
    `bits` bytes: each such unit is widened to one int64 and shifted apart."""
    rows, units = packed.shape[0], -(-cols // 8)
    raw = packed.contiguous().view(torch.uint8)[:, : units * bits]
    wide = torch.zeros(rows, units, 8, dtype=torch.uint8, device=packed.device)
    wide[..., :bits] = F.pad(raw, (0, units * bits - raw.shape[1])).view(rows, units, bits)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device)
    codes = (wide.view(torch.int64) >> shifts) & (2**bits - 1)
    return codes.view(rows, units * 8)[:, :cols].to(torch.uint8)
