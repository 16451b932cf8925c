"""Runtime replacements for compressed modules (all keep the replaced module's interface).

Each replacement lists in `stored_names` the parameters that belong to its compressed
group (they are saved once, under the group's prefix); everything else it holds, such as
the original bias, is an ordinary parameter of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


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


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` [out, in] (a decoded matrix) and the original bias."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return linear


def dense_embedding(weight: torch.Tensor, padding_idx: int | None) -> nn.Embedding:
    return nn.Embedding.from_pretrained(
        weight.detach().clone(), freeze=False, padding_idx=padding_idx
    )
