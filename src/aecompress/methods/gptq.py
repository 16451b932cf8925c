"""Weight-only integer quantization methods: `rtn` (round to nearest) and `gptq`.

Each member matrix [out, in] is stored as compressed-tensors' `pack-quantized` form stores
it (maths and conventions: quantize.py): `codes`, `bits` per weight packed into int32 words
[out, ceil(in * bits / 32)]; `scales` [out, groups] in the storage dtype; for an asymmetric
scheme `zeros` [ceil(out * bits / 32), groups] (zero points packed along the rows). The
width is (bits, group), group 0 meaning one group per row: `--ratio` picks the most bits,
then the smallest group, whose stored bits fit the budget (`bits` and `group` options fix
them). Rebuilt as (code - zero) * scale, differentiable in the scales, so that block
refinement trains the scales with the codes fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from aecompress.budget import STORAGE_DTYPES
from aecompress.errors import AecompressError
from aecompress.methods.base import (
    FitContext,
    GroupSpec,
    Method,
    MethodLayout,
    MethodOptions,
    Stored,
    Width,
    register,
)
from aecompress.methods.quantize import Quantized, QuantScheme, gptq, rtn, stored_bits
from aecompress.methods.stage import GPTQSettings, rebuild_quantized, store_quantized
from aecompress.modules import QuantizedLinear

AUTO_GROUPS = (32, 64, 128, 0)  # the groups `group: auto` tries, smallest first; 0: a row


class QuantOptions(MethodOptions):
    """`bits` (2..8; None: the most that fit the ratio), `group` (consecutive columns
    sharing a scale: a number, `row`, or `auto`: the smallest of 32, 64, 128 and a row
    that fits with the bits), `symmetric` (no zero points stored)."""

    bits: int | None = Field(None, ge=2, le=8)
    group: int | Literal["row", "auto"] = "auto"
    symmetric: bool = True


class GPTQOptions(QuantOptions, GPTQSettings):
    """QuantOptions and GPTQ's settings (`damp`, `block`, `act_order`: GPTQSettings, which
    a gptq quantization stage takes too)."""


class QuantLayout(MethodLayout):
    """The scheme of every member and its column count."""

    bits: int = Field(ge=2, le=8)
    group: int | None
    symmetric: bool
    cols: int = Field(ge=1)


def scheme_of(width: Width, symmetric: bool) -> QuantScheme:
    assert isinstance(width, tuple) and len(width) == 2
    bits, group = width
    return QuantScheme(bits, group or None, symmetric)


@register
class RoundToNearest(Method):
    """Each weight rounded to its group's nearest code (min/max or absmax scales)."""

    name = "rtn"
    Options = QuantOptions
    options: QuantOptions
    Layout = QuantLayout

    def groups(self, spec: GroupSpec) -> list[int]:
        """The groups (0: a row) to choose from, smallest first, that divide the columns."""
        group = self.options.group
        if group == "auto":
            return [g for g in AUTO_GROUPS if g == 0 or spec.cols % g == 0]
        return [0 if group == "row" else group]

    def bit_choices(self) -> list[int]:
        return [self.options.bits] if self.options.bits else list(range(2, 9))

    def check(self, spec: GroupSpec) -> None:
        for group in self.groups(spec):
            QuantScheme(self.bit_choices()[0], group or None, True).check_divides(spec.cols)

    def cost(self, width: Width, spec: GroupSpec) -> int:
        scheme = scheme_of(width, self.options.symmetric)
        return spec.count * stored_bits(scheme, spec.rows, spec.cols, spec.float_bits)

    def max_width(self, spec: GroupSpec) -> int:
        return max(self.bit_choices())

    def candidates(self, spec: GroupSpec) -> list[tuple[int, int]]:
        """Every (bits, group) allowed, best first: most bits, then smallest group."""
        return [(b, g) for b in reversed(self.bit_choices()) for g in self.groups(spec)]

    def within(self, spec: GroupSpec, budget: float) -> tuple[int, int] | None:
        """The best candidate whose stored bits fit `budget` (None: not even the cheapest)."""
        return next((w for w in self.candidates(spec) if self.cost(w, spec) <= budget), None)

    def allocation_budgets(self, spec: GroupSpec, budget: float) -> list[float]:
        """The exact stored bits of each allowed bits at the group `budget` gives, and of
        each allowed group at its bits: budget allocation gives sensitive groups more
        bits, others fewer."""
        bits, group = self.within(spec, budget) or self.candidates(spec)[-1]
        widths = [(b, group) for b in self.bit_choices()] + [(bits, g) for g in self.groups(spec)]
        return sorted({float(self.cost(w, spec)) for w in widths})

    def solve_width(self, matrices: Sequence[torch.Tensor], context: FitContext) -> Width:
        spec = context.spec
        width = self.within(spec, context.budget)
        if width is not None:
            return width
        cheapest = self.candidates(spec)[-1]
        raise AecompressError(
            f"{spec.name}: the ratio is too large, even {cheapest[0]} bits with "
            f"{f'groups of {cheapest[1]}' if cheapest[1] else 'one scale per row'} store "
            f"{self.cost(cheapest, spec)} bits against a budget of {int(context.budget)}"
        )

    def larger(self, width: Width, spec: GroupSpec) -> list[Width]:
        """The candidates just better than `width`: a smaller group, or one bit more."""
        candidates = self.candidates(spec)
        assert isinstance(width, tuple)
        position = candidates.index((width[0], width[1]))
        near: list[Width] = [w for w in candidates[:position] if w[0] in (width[0], width[0] + 1)]
        return near[-2:]

    def quantize(
        self, matrix: torch.Tensor, index: int, scheme: QuantScheme, context: FitContext
    ) -> Quantized:
        return rtn(matrix, scheme, scale_dtype=STORAGE_DTYPES[context.spec.storage_dtype])

    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        scheme = scheme_of(width, self.options.symmetric)
        members = []
        for index, matrix in enumerate(matrices):
            quantized = self.quantize(matrix.float(), index, scheme, context)
            members.append(store_quantized("", quantized))
        layout = QuantLayout(
            bits=scheme.bits, group=scheme.group, symmetric=scheme.symmetric, cols=context.spec.cols
        )
        return Stored({}, members, width, layout, {"bits": scheme.bits, "group": scheme.group})

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        layout = stored.layout
        assert isinstance(layout, QuantLayout)
        scheme = QuantScheme(layout.bits, layout.group, layout.symmetric)
        return rebuild_quantized(stored.members[index], "", scheme, layout.cols)

    def linear(
        self, stored: Stored, index: int, bias: torch.Tensor | None, *, prefill: bool = False
    ) -> nn.Module:
        """Served packed (QuantizedLinear: torch's int4 / int8 CPU kernels where they
        apply, else rows dequantized per call); for `prefill` (calibration passes) decoded
        once, as sparse methods are."""
        if prefill:
            return super().linear(stored, index, bias)
        layout = stored.layout
        assert isinstance(layout, QuantLayout)
        member = stored.members[index]
        return QuantizedLinear(
            member["codes"],
            member["scales"].detach(),
            member.get("zeros"),
            layout.bits,
            layout.cols,
            bias,
        )


SEQUENTIAL_BITS = 2  # gptq's `--pipeline auto`: sequential at these bits or fewer


@register
class GPTQ(RoundToNearest):
    """GPTQ: codes chosen column by column, each column's rounding error compensated on the
    columns not yet visited, minimising the output error ||(W - W_hat) X^T|| under the
    layer's inputs (X^T X from calibration). Token embeddings, which have no input
    activations, are rounded to nearest."""

    name = "gptq"
    Options = GPTQOptions
    options: GPTQOptions

    def statistics_needed(self) -> set[str]:
        return {"xtx"}

    def sequential_by_default(self, spec: GroupSpec, budget: float) -> bool:
        """At 2 bits: each layer fitted on the inputs of the layers already quantized
        before it (SmolLM2 MLPs, g64, WikiText-2 validation: 1,333 against 11,878 on the
        dense model's statistics); at 3 and 4 bits the dense model's statistics did better
        (51.21 against 69.78, 27.87 against 27.94; benchmarks/results/quantization/
        pipeline.md)."""
        width = self.within(spec, budget)
        return width is not None and width[0] <= SEQUENTIAL_BITS

    def quantize(
        self, matrix: torch.Tensor, index: int, scheme: QuantScheme, context: FitContext
    ) -> Quantized:
        if context.spec.kind == "embedding":
            return super().quantize(matrix, index, scheme, context)
        return gptq(
            matrix,
            context.statistic(index, "xtx"),
            scheme,
            **self.options.gptq_settings,
            scale_dtype=STORAGE_DTYPES[context.spec.storage_dtype],
        )
