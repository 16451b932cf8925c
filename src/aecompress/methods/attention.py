"""Structured attention compression: head dimensions removed, the rest compensated.

`attn-dims` fits `attn` targets (a Llama-style attention's q, k, v and o of one layer,
stacked as [q; k; v; o^T], targets.ATTN_PARTS) with RoPE pairing dimension i of a head
with i + D/2 (rotate_half), D = head_dim, and grouped-query attention (query head h reads
key / value head g = h // (heads / kv_heads)). Its width is the kept head dim d' (even, the
same for every head of the layer and for q / k and v / o: transformers' Llama has one
head_dim). With C = X^T X of the hidden states entering q, k and v (calibration):

- q / k keep d'/2 rotary pairs (pair p: dims p and p + D/2), the same for every head of
  the layer, chosen by `pairs`:
    score  the pairs of largest summed score over query heads, the score of pair p for
           head h in group g the sum over its two dims i of
           sqrt((Q_h[i] C Q_h[i]^T) (K_g[i] C K_g[i]^T)) (the energy the dim brings to
           the attention logits q . k);
    low    the lowest frequencies, the last d'/2 pairs;
    high   the highest frequencies, the first d'/2 pairs.
  The kept rows of each head are ordered [kept pairs..., their partners + D/2...], so
  rotate_half still pairs them; the attention logits are those of the original restricted
  to the kept dims, at the ORIGINAL softmax scaling 1/sqrt(D).
- v / o are refitted jointly per KV group (SVD-LLM's whitening): with O_h [hidden, D] the
  columns of o of query head h and V_g [D, hidden] the rows of v of KV head g, and L the
  Cholesky factor of C + ridge (linalg.whitening), the rank-d' truncated SVD of the
  stacked whitened product [O_h1; O_h2; ...] V_g L gives its left singular vectors U,
  split by head as O'_h [hidden, d'], and V'_g = U^T [O_h1; ...] V_g [d', hidden]. This
  minimises sum over h in g of ||(O_h V_g - O'_h V'_g) X^T||^2 (+ ridge): each head's
  output error as if the attention mixed nothing (its softmax weights are ignored; they
  mix tokens, not dims). d' = D reproduces v / o exactly.

Stored per member, in the storage dtype: q [heads * d', hidden], k and v
[kv_heads * d', hidden], o [hidden, heads * d'], and the kept pairs as a bitmap of the D/2
pairs in int32 words. Served as the model's own attention class with head_dim d' (q, k, v,
o nn.Linear modules sharing the stored parameters), whose forward slices the rotary cos /
sin to the kept dims and keeps the original scaling (sliced_attention). `reconstruct`
gives the original shapes: q / k zero at the dropped dims, v's first d' rows of each KV
head V'_g and o's first d' columns of each query head O'_h, zero beyond: the same
attention output as the served module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from aecompress.budget import solve_width
from aecompress.errors import AecompressError
from aecompress.methods.base import (
    FitContext,
    GroupSpec,
    MethodLayout,
    MethodOptions,
    Stored,
    Width,
    register,
)
from aecompress.methods.linalg import whitening
from aecompress.methods.pruning import BITS, pack_bits, unpack_bits, words
from aecompress.methods.structured import StructuredMethod, shared_linear
from aecompress.targets import ATTN_PARTS

STORED = ("q", "k", "v", "o")  # member tensors, in ATTN_PARTS order


class AttnDimsOptions(MethodOptions):
    """`pairs`: which rotary pairs q / k keep (module docstring); `ridge`: the whitening's
    ridge over the mean diagonal of X^T X (linalg.whitening)."""

    pairs: Literal["score", "low", "high"] = "score"
    ridge: float = Field(1e-4, ge=0)


class AttnDimsLayout(MethodLayout):
    """The attention's original head_dim (the kept bitmap covers head_dim / 2 pairs) and
    its numbers of query and key / value heads."""

    head_dim: int
    heads: int
    kv_heads: int


def attention_shape(spec: GroupSpec) -> tuple[int, int, int]:
    """(head_dim, heads, kv_heads) of an attn member [(2 heads + 2 kv) * head_dim, hidden]."""
    size, kv = spec.head_dim, spec.kv_heads
    if size is None or kv is None or size % 2 or spec.rows % (2 * size):
        raise AecompressError(
            f"{spec.name}: attn-dims needs the model's head_dim (even) and key / value heads"
        )
    heads = spec.rows // (2 * size) - kv
    if heads <= 0 or heads % kv:
        raise AecompressError(
            f"{spec.name}: {spec.rows} rows are not q, k, v, o of {kv} key / value heads "
            f"of {size} dims"
        )
    return size, heads, kv


def split_attention(
    matrix: torch.Tensor, heads: int, kv: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An attn member [q; k; v; o^T] as q [heads * D, H], k, v [kv * D, H], o [H, heads * D]."""
    q, k, v, o_t = matrix.split([heads * size, kv * size, kv * size, heads * size])
    return q, k, v, o_t.T


def pair_scores(
    q: torch.Tensor, k: torch.Tensor, gram: torch.Tensor, heads: int, kv: int
) -> torch.Tensor:
    """Score of each rotary pair p, summed over query heads h (module docstring) [D / 2]."""
    q_energy = ((q.double() @ gram) * q.double()).sum(dim=1).clamp_min(0).view(heads, -1)
    k_energy = ((k.double() @ gram) * k.double()).sum(dim=1).clamp_min(0).view(kv, -1)
    per_dim = (q_energy * k_energy.repeat_interleave(heads // kv, dim=0)).sqrt().sum(dim=0)
    return per_dim.view(2, -1).sum(dim=0)  # dims p and p + D/2 together


def joint_values(
    v: torch.Tensor,
    o: torch.Tensor,
    factor: torch.Tensor,
    width: int,
    heads: int,
    kv: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """v' [kv * d', H] and o' [H, heads * d'] with O'_h V'_g the whitened rank-d' truncation
    of [O_h; ...] V_g for each KV group g (module docstring), float32."""
    hidden, size, per_group = o.shape[0], v.shape[0] // kv, heads // kv
    new_v = v.new_zeros(kv, width, v.shape[1])
    new_o = o.new_zeros(hidden, heads, width)
    heads_o = o.double().view(hidden, heads, size)
    for group in range(kv):
        members = range(group * per_group, (group + 1) * per_group)
        stacked = torch.cat([heads_o[:, h] for h in members])  # [n * hidden, D]
        value = v[group * size : (group + 1) * size].double()  # [D, hidden]
        basis, upper = torch.linalg.qr(stacked)  # the product's columns lie in basis's span
        left = torch.linalg.svd(upper @ (value @ factor), full_matrices=False)[0]
        kept = basis @ left[:, :width]  # U: the top left singular vectors of the product
        rank = kept.shape[1]
        new_v[group, :rank] = ((kept.T @ stacked) @ value).float()
        new_o[:, members.start : members.stop, :rank] = (
            kept.view(per_group, hidden, rank).permute(1, 0, 2).float()
        )
    return new_v.reshape(kv * width, -1), new_o.reshape(hidden, heads * width)


def kept_dims(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the kept dims of a head, [kept pairs..., partners...], from the pairs'
    bool mask [D / 2]."""
    pairs = torch.nonzero(mask).flatten()
    return torch.cat([pairs, pairs + mask.shape[0]])


_SLICED: dict[type[nn.Module], type[nn.Module]] = {}


def sliced_attention(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the attention class `cls` (made once per class) whose forward passes
    the rotary cos / sin of its kept dims (buffer `kept_dims`) to `cls.forward`: the
    attention reshapes by its own head_dim and scales by its own `scaling`, kept at the
    original head_dim's."""
    if cls in _SLICED.values():
        return cls
    if cls not in _SLICED:
        parent: Callable[..., Any] = cls.forward

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            dims = self.kept_dims
            if "position_embeddings" in kwargs:
                cos, sin = kwargs["position_embeddings"]
                kwargs["position_embeddings"] = (cos[..., dims], sin[..., dims])
            else:
                cos, sin = args[1]
                args = (args[0], (cos[..., dims], sin[..., dims]), *args[2:])
            return parent(self, *args, **kwargs)

        _SLICED[cls] = type(f"Sliced{cls.__name__}", (cls,), {"forward": forward})
    return _SLICED[cls]


@register
class AttnDims(StructuredMethod):
    """Keeps `width` dims of every attention head: whole rotary pairs of q / k by score,
    a whitened low-rank refit of v / o per key-value group, then 40 steps of block
    refinement by default."""

    name = "attn-dims"
    Options = AttnDimsOptions
    options: AttnDimsOptions
    Layout = AttnDimsLayout
    kind = "attn"
    removes = "head dims of whole attentions"
    parts = "q, k, v and o"
    # the v / o refit ignores softmax mixing: 40 Adam steps against the dense block took
    # SmolLM2's attentions from WikiText-2 validation 32.96 to 26.66 at ratio 1.25 and
    # 66.63 to 40.29 at 1.67 (benchmarks/results/structured)
    refine_steps = 40

    def check(self, spec: GroupSpec) -> None:
        super().check(spec)
        attention_shape(spec)

    def cost(self, width: Width, spec: GroupSpec) -> int:
        assert isinstance(width, int)
        size, heads, kv = attention_shape(spec)
        numbers = width * spec.cols * (2 * heads + 2 * kv)  # q, k, v, o at head dim width
        return spec.count * (spec.floats(numbers) + BITS * words(size // 2))

    def max_width(self, spec: GroupSpec) -> int:
        return attention_shape(spec)[0]

    def larger(self, width: Width, spec: GroupSpec) -> list[Width]:
        assert isinstance(width, int)
        return [width + 2] if width < self.max_width(spec) else []

    def solve_width(self, matrices: Sequence[torch.Tensor], context: FitContext) -> Width:
        """The largest even head dim whose cost fits (rotary pairs are kept whole)."""
        spec = context.spec
        pairs = solve_width(
            lambda p: self.cost(2 * p, spec),
            context.budget,
            self.max_width(spec) // 2,
            spec.name,
            "attn-dims keeps whole rotary pairs: its smallest width is head dim 2",
        )
        return 2 * pairs

    def kept_pairs(
        self, q: torch.Tensor, k: torch.Tensor, gram: torch.Tensor, count: int, heads: int
    ) -> torch.Tensor:
        """Indices of the `count` kept rotary pairs, ascending."""
        total = q.shape[0] // heads // 2
        if self.options.pairs == "low":
            return torch.arange(total - count, total, device=q.device)
        if self.options.pairs == "high":
            return torch.arange(count, device=q.device)
        kv = k.shape[0] // (2 * total)
        scores = pair_scores(q, k, gram, heads, kv)
        return scores.topk(count).indices.sort().values.to(q.device)

    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        assert isinstance(width, int)
        if width % 2 or width < 2:
            raise AecompressError(f"{context.spec.name}: attn-dims keeps an even head dim")
        size, heads, kv = attention_shape(context.spec)
        members = []
        for index, matrix in enumerate(matrices):
            q, k, v, o = split_attention(matrix, heads, kv, size)
            hidden = matrix.shape[1]
            gram = context.statistic(index, "xtx")
            pairs = self.kept_pairs(q, k, gram, width // 2, heads)
            mask = torch.zeros(size // 2, dtype=torch.bool, device=matrix.device)
            mask[pairs] = True
            dims = kept_dims(mask)
            factor = whitening(gram, self.options.ridge)
            new_v, new_o = joint_values(v, o, factor.to(matrix.device), width, heads, kv)
            members.append(
                {
                    "q": q.view(heads, size, hidden)[:, dims].reshape(-1, hidden).contiguous(),
                    "k": k.view(kv, size, hidden)[:, dims].reshape(-1, hidden).contiguous(),
                    "v": new_v.to(matrix.dtype).contiguous(),
                    "o": new_o.to(matrix.dtype).contiguous(),
                    "kept": pack_bits(mask),
                }
            )
        layout = AttnDimsLayout(head_dim=size, heads=heads, kv_heads=kv)
        return Stored({}, members, width, layout)

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        """[q; k; v; o^T] at the original shapes (module docstring)."""
        member, layout = stored.members[index], stored.layout
        assert isinstance(layout, AttnDimsLayout)
        size, heads, kv = layout.head_dim, layout.heads, layout.kv_heads
        q, width = member["q"], member["q"].shape[0] // heads
        hidden = q.shape[1]
        mask = unpack_bits(member["kept"], size // 2).to(q.device)
        dims = kept_dims(mask)
        full_q = q.new_zeros(heads, size, hidden)
        full_q[:, dims] = q.view(heads, width, hidden)
        full_k = q.new_zeros(kv, size, hidden)
        full_k[:, dims] = member["k"].view(kv, width, hidden)
        full_v = q.new_zeros(kv, size, hidden)
        full_v[:, :width] = member["v"].view(kv, width, hidden)
        full_o = q.new_zeros(hidden, heads, size)
        full_o[:, :, :width] = member["o"].view(hidden, heads, width)
        parts = (full_q, full_k, full_v, full_o.reshape(hidden, -1).T)
        return torch.cat([part.reshape(-1, hidden) for part in parts])

    def structured(self, stored: Stored, index: int, original: nn.Module) -> nn.Module:
        """The attention `original` with head_dim d' (sliced_attention), its q, k, v, o the
        stored matrices as nn.Linear modules sharing the stored parameters."""
        member, layout = stored.members[index], stored.layout
        assert isinstance(layout, AttnDimsLayout)
        smaller = copy.copy(original)
        smaller._modules = dict(original._modules)
        smaller._buffers = dict(original._buffers)
        smaller._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
        for name, key in zip(ATTN_PARTS, STORED, strict=True):
            setattr(smaller, name, shared_linear(member[key]))
        smaller.__class__ = sliced_attention(type(original))
        smaller.__dict__["head_dim"] = member["q"].shape[0] // layout.heads
        mask = unpack_bits(member["kept"], layout.head_dim // 2)
        smaller.register_buffer("kept_dims", kept_dims(mask), persistent=False)
        return smaller
