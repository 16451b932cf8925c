"""Magnitude pruning with every stored number counted, positions included."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from aecompress.errors import AecompressError
from aecompress.methods.base import FitContext, Method, MethodOptions, Stored, register

BITS = 32  # a position bitmap is stored as int32 words: n*m bits count as ceil(n*m/32) numbers


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool mask [N] packed little-endian into int32 words [ceil(N/32)]."""
    packed = np.packbits(mask.numpy().astype(np.uint8), bitorder="little")
    packed = np.pad(packed, (0, -packed.size % 4))
    return torch.from_numpy(packed.view("<i4").copy())


def unpack_bits(words: torch.Tensor, size: int) -> torch.Tensor:
    """The flat bool mask [size] packed in `words` by pack_bits."""
    raw = words.numpy().astype("<i4").view(np.uint8)
    return torch.from_numpy(np.unpackbits(raw, bitorder="little")[:size].astype(bool))


def index_cost(scheme: str, numel: int) -> int:
    """Numbers spent on positions for one member: the bitmap's words (int32 indices are
    counted per kept weight instead)."""
    return -(-numel // BITS) if scheme == "bitmap" else 0


def kept_count(scheme: str, count: int, numel: int, budget: float) -> int:
    """Weights that fit: bitmap, budget - words; int32 indices, one value + one index each."""
    if scheme == "bitmap":
        return int(budget) - count * index_cost(scheme, numel)
    return int(budget) // 2


class PruneOptions(MethodOptions):
    """`index`: how positions are stored; `auto` picks whichever keeps more weights (the
    bitmap below ratio 16, int32 indices above)."""

    index: Literal["bitmap", "int32", "auto"] = "auto"


@register
class MagnitudePruning(Method):
    """Magnitude pruning: keep the largest |w| of the group that fit, zero the rest.

    Stores per member the kept values (row-major order) and their positions: a bitmap over
    the matrix (n*m bits in int32 words, ceil(n*m/32) numbers) or int32 flat indices (one
    number per kept weight); both count against the budget. A stack of layers keeps the
    largest |w| over the whole stack (one threshold). Minimises ||W - W_hat||_F for the
    number of kept weights. `meta` records also the size without positions (the paper's
    bookkeeping). Served as a decoded dense weight.
    """

    name = "prune"
    Options = PruneOptions
    options: PruneOptions

    def fit(self, matrices: Sequence[torch.Tensor], budget: float, context: FitContext) -> Stored:
        count, (rows, cols) = len(matrices), matrices[0].shape
        numel = rows * cols
        if numel >= 2**31:
            raise AecompressError(f"{context.group}: matrices over 2^31 entries cannot be indexed")
        schemes = ["bitmap", "int32"] if self.options.index == "auto" else [self.options.index]
        scheme = max(schemes, key=lambda s: kept_count(s, count, numel, budget))
        kept = min(kept_count(scheme, count, numel, budget), count * numel)
        if kept < 1:
            raise AecompressError(
                f"{context.group}: the ratio is too large, the {scheme} positions alone "
                f"fill the budget of {int(budget)} numbers"
            )
        flat = torch.cat([m.reshape(-1) for m in matrices])
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[flat.abs().topk(kept, sorted=False).indices] = True
        members = []
        for index in range(count):
            mask = chosen[index * numel : (index + 1) * numel]
            values = matrices[index].reshape(-1)[mask].clone()
            if scheme == "bitmap":
                members.append({"values": values, "mask": pack_bits(mask)})
            else:
                positions = mask.nonzero().squeeze(1).to(torch.int32)
                members.append({"values": values, "indices": positions})
        meta = {
            "index": scheme,
            "kept": kept,
            "density": kept / (count * numel),
            "index_numbers": count * index_cost(scheme, numel) if scheme == "bitmap" else kept,
            "stored_without_index": kept,
            "ratio_without_index": count * numel / kept,
            "shape": [rows, cols],
        }
        return Stored({}, members, meta)

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        rows, cols = stored.meta["shape"]
        member = stored.members[index]
        values = member["values"]
        dense = torch.zeros(rows * cols, dtype=values.dtype)
        if "mask" in member:
            dense[unpack_bits(member["mask"], rows * cols)] = values
        else:
            dense[member["indices"].long()] = values
        return dense.view(rows, cols)
