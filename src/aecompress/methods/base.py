"""The one interface every compression method implements, and the method registry.

A method fits one group of same-shape matrices ([out, in] layout, stacked row-wise when
the group spans layers) at a width (rank, latent width, kept weights, ...) and returns
what it stores. It declares what a width costs in stored bits (floating tensors at the
artifact's storage dtype, integer tensors at their own width), so that the engine solves
the largest width within a budget and checks the declaration against what was stored.
It rebuilds each matrix densely, and may serve it with a cheaper module.

Adding a method is one file in this package: a `Method` subclass decorated `@register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from aecompress.budget import float_bits, solve_width
from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError, describe
from aecompress.methods.quantize import stored_bits
from aecompress.methods.stage import QuantizedLayout, QuantStage
from aecompress.modules import dense_embedding, dense_linear
from aecompress.numerics import all_finite
from aecompress.targets import FFN_PARTS

# The budgets, as multiples of a group's uniform one, at which budget allocation fits and
# scores a group by default (Method.allocation_budgets).
ALLOCATION_MULTIPLES = (0.5, 0.65, 0.8, 1.0, 1.2, 1.4, 1.6)

# A width is one integer (rank, latent width, terms, kept weights) or, for methods sized
# along several axes (Tucker ranks, sparse + low-rank), a tuple of them.
Width = int | tuple[int, ...]


class MethodOptions(BaseModel):
    """Options of a method; unknown keys are an error (a typo in a recipe fails loudly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodLayout(BaseModel):
    """What rebuilding a group needs beyond its tensors and shapes (per method; usually
    nothing). Saved in the manifest and validated when read back: no defaults to guess.
    `quantize`: how the group's matrices were quantized (None: stored as floats)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quantize: QuantizedLayout | None = None


@dataclass(frozen=True)
class GroupSpec:
    """What a method fits: `count` matrices of [rows, cols] of one family, stacked row-wise.

    `kind` says how the matrices are used (an embedding's rows are looked up by token; an
    ffn member is a gated MLP's [up; gate; down^T], an attn member an attention's
    [q; k; v; o^T], targets.STRUCTURED_PARTS),
    `head_dim` is the model's attention head size (None when the model has none),
    `storage_dtype` the dtype of the artifact's floating tensors (float_bits: its width),
    `quantize` the quantization stage of its matrix-shaped stored tensors (stage.py; None:
    floats), `kv_heads` the model's number of key / value heads (None: it has none).
    """

    name: str
    family: str
    kind: Literal["linear", "embedding", "ffn", "attn"]
    count: int
    rows: int
    cols: int
    head_dim: int | None = None
    storage_dtype: str = "float32"
    quantize: QuantStage | None = None
    kv_heads: int | None = None

    @property
    def float_bits(self) -> int:
        """Bits of one floating number in the artifact."""
        return float_bits(self.storage_dtype)

    @property
    def numel(self) -> int:
        """Numbers in the group's original matrices."""
        return self.count * self.rows * self.cols

    @property
    def input_width(self) -> int:
        """Features of the inputs a member reads (the side of its X^T X): its columns, or
        for an ffn member the intermediate activations its down projection reads."""
        return self.rows // len(FFN_PARTS) if self.kind == "ffn" else self.cols

    @property
    def dense_bits(self) -> int:
        """Bits of the group's original matrices stored densely in the storage dtype."""
        return self.numel * self.float_bits

    def floats(self, numbers: int) -> int:
        """Bits of `numbers` floating numbers in the storage dtype."""
        return numbers * self.float_bits

    def matrix_bits(self, rows: int, cols: int) -> int:
        """Bits of a stored [rows, cols] matrix: floats, or quantized by the stage."""
        if self.quantize is None:
            return self.floats(rows * cols)
        return stored_bits(self.quantize.scheme, rows, cols, self.float_bits)


@dataclass
class FitContext:
    """What a fit may use beyond the weights: the group, its budget (stored bits), the
    seed, per-member calibration statistics (when the method asked for some), a callback
    giving the model's validation metric with other matrices swapped in, and progress.
    `owns_statistics`: the fit is their last reader, so `fit` may factorise X^T X where it
    lies instead of beside it (one m x m float64 matrix less at the peak)."""

    spec: GroupSpec
    budget: float = float("inf")
    seed: int = 0
    statistics: Sequence[TargetStatistics] | None = None
    validate: Callable[[list[torch.Tensor]], float] | None = None
    progress: bool = True
    owns_statistics: bool = False  # no one reads them after this fit: it may overwrite them

    def member_statistics(self, index: int) -> TargetStatistics:
        """Calibration statistics of member `index` (a clear error when there are none)."""
        if self.statistics is None or index >= len(self.statistics):
            raise AecompressError(f"{self.spec.name}: this method needs calibration statistics")
        return self.statistics[index]

    def statistic(self, index: int, name: str) -> torch.Tensor:
        """One calibration statistic of member `index`, float64 (a clear error if missing)."""
        value = getattr(self.member_statistics(index), name)
        if value is None:
            raise AecompressError(f"{self.spec.name}: calibration statistic '{name}' is missing")
        return value.double()


ROW_WEIGHTS = ("counts", "fisher", "l1")


def row_weights(kind: str, context: FitContext) -> torch.Tensor:
    """Per-row importance c_i of every member, concatenated in stacking order (float64).

    counts: sqrt(count + 1) of each token in calibration text (embedding rows);
    fisher: sqrt(sum_j F_ij), F the summed squared gradients of the LM loss;
    l1: sum_j |g_ij|, the summed absolute gradients.
    """
    spec = context.spec
    if kind == "counts" and spec.kind != "embedding":
        raise AecompressError(
            f"{spec.name}: row weights 'counts' exist for embeddings only (token counts)"
        )
    parts = []
    for index in range(spec.count):
        value = context.statistic(index, kind)
        if kind == "counts":
            weight = (value + 1).sqrt()
        elif kind == "fisher":
            weight = value.sum(dim=1).clamp_min(0).sqrt()
        else:
            weight = value.abs().sum(dim=1)
        if weight.shape != (spec.rows,):
            raise AecompressError(
                f"{spec.name}: '{kind}' statistics of member {index} cover {weight.shape[0]} "
                f"rows, the matrix has {spec.rows}"
            )
        parts.append(weight)
    weights = torch.cat(parts)
    if not all_finite(weights) or not (weights > 0).any():
        raise AecompressError(f"{spec.name}: '{kind}' row weights are not finite and positive")
    return weights


@dataclass
class Stored:
    """What a method stores for one group: tensors shared by all members, per-member
    tensors, the width they were fitted at, the layout rebuilding needs, and report figures
    (`info`: losses, selected epoch, ...; never read back). Tensors become nn.Parameters
    once fitted so that runtime modules share them and training updates what is saved."""

    shared: dict[str, torch.Tensor]
    members: list[dict[str, torch.Tensor]]
    width: Width
    layout: MethodLayout = field(default_factory=MethodLayout)
    info: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat view: shared tensors as 'shared.NAME', member i's as 'i.NAME'."""
        flat = {f"shared.{name}": t for name, t in self.shared.items()}
        for index, member in enumerate(self.members):
            flat.update({f"{index}.{name}": t for name, t in member.items()})
        return flat

    @classmethod
    def from_tensors(
        cls, flat: dict[str, torch.Tensor], count: int, width: Width, layout: MethodLayout
    ) -> Stored:
        shared = {k.removeprefix("shared."): t for k, t in flat.items() if k.startswith("shared.")}
        members: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
        for key, tensor in flat.items():
            head, _, name = key.partition(".")
            if head != "shared":
                members[int(head)][name] = tensor
        return cls(shared, members, width, layout)

    def as_parameters(self, trainable: bool = True) -> Stored:
        """The same tensors wrapped as nn.Parameters (float tensors only: indices stay)."""

        def wrap(t: torch.Tensor) -> torch.Tensor:
            if isinstance(t, nn.Parameter) or not t.is_floating_point():
                return t
            fresh = t.detach().clone(memory_format=torch.contiguous_format)
            return nn.Parameter(fresh, requires_grad=trainable)

        return Stored(
            {k: wrap(t) for k, t in self.shared.items()},
            [{k: wrap(t) for k, t in m.items()} for m in self.members],
            self.width,
            self.layout,
            self.info,
        )


class Method(ABC):
    """A compression method: options, the cost of a width, fit, rebuild, runtime modules."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    Layout: ClassVar[type[MethodLayout]] = MethodLayout
    quantizable: ClassVar[bool] = False  # supports a quantization stage (stage.py)
    # block refinement steps (recipe `refine`) when the recipe gives none, chosen on
    # validation for the method; the most any method of a recipe asks for is run
    refine_steps: ClassVar[int] = 0
    # calibration windows (samples, tokens each) when the recipe sets neither, chosen on
    # validation for the method; the most any method of a recipe asks for is used
    calibration_size: ClassVar[tuple[int, int] | None] = None

    def __init__(self, options: MethodOptions) -> None:
        self.options = options

    def statistics_needed(self) -> set[str]:
        """Calibration statistics `fit` reads from context.statistics (see calibration.py)."""
        return set()

    def sequential_by_default(self, spec: GroupSpec, budget: float) -> bool:
        """Whether `--pipeline auto` runs the group of `spec` at `budget` stored bits
        sequentially: by default when the method measures output error (it asks for
        X^T X), chosen on validation for each such method."""
        return "xtx" in self.statistics_needed()

    def selects_on_validation(self) -> bool:
        """Whether fitting measures the whole model's validation metric (context.validate)."""
        return False

    def allocation_proxy(self) -> Method:
        """The method that scores candidate sizes in budget allocation: itself, or a
        faster one whose errors follow it (e.g. the AE's SVD starting point)."""
        return self

    def allocation_budgets(self, spec: GroupSpec, budget: float) -> list[float]:
        """The budgets (stored bits) at which budget allocation fits and scores a group
        planned at `budget`: multiples of it (ALLOCATION_MULTIPLES), or, for a method with
        few discrete widths, the exact costs of some of them."""
        return [budget * multiple for multiple in ALLOCATION_MULTIPLES]

    def stage_runs_gptq(self) -> bool:
        """Whether a gptq stage runs GPTQ on this method's stored matrices (quantize_matrix
        under their input statistics), so that its GPTQ settings apply."""
        return False

    def check(self, spec: GroupSpec) -> None:  # noqa: B027 (optional hook)
        """Raise a one-line AecompressError if the method cannot fit this group at all
        (called before any calibration or fitting work)."""

    @abstractmethod
    def cost(self, width: Width, spec: GroupSpec) -> int:
        """Bits stored for the group at `width` (must not decrease as width grows): floating
        tensors at spec.float_bits per number, integer tensors at their dtype's width."""

    @abstractmethod
    def max_width(self, spec: GroupSpec) -> int:
        """The largest meaningful width (e.g. full rank)."""

    def larger(self, width: Width, spec: GroupSpec) -> list[Width]:
        """The widths one step larger than `width` (none at the maximum): a solved width is
        tight when every one of them costs more than the budget."""
        assert isinstance(width, int)
        return [width + 1] if width < self.max_width(spec) else []

    def budget_hint(self, spec: GroupSpec) -> str:
        """What would fit when not even the smallest width does (e.g. a smaller fixed part
        of the stored form); empty when the ratio is simply too large."""
        return ""

    def solve_width(self, matrices: Sequence[torch.Tensor], context: FitContext) -> Width:
        """The width to fit at: by default the largest whose cost fits context.budget
        (one-line error if none does). Methods sized along several axes choose from the
        data (e.g. Tucker ranks by the energy of each mode)."""
        spec = context.spec
        return solve_width(
            lambda w: self.cost(w, spec),
            context.budget,
            self.max_width(spec),
            spec.name,
            self.budget_hint(spec),
        )

    @abstractmethod
    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        """Compress `matrices` (same shape, [out, in]) at `width`."""

    @abstractmethod
    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        """Member `index` rebuilt as a dense [out, in] matrix (differentiable in the stored
        float tensors, so that block refinement can train them)."""

    def linear(
        self, stored: Stored, index: int, bias: torch.Tensor | None, *, prefill: bool = False
    ) -> nn.Module:
        """The runtime module serving member `index` as a Linear (default: decoded once).
        `prefill`: it will only see long inputs (calibration passes while compressing), so
        the form fastest there is preferred (a quantized matrix: decoded once rather than
        a kernel made for short inputs)."""
        with torch.no_grad():
            return dense_linear(self.reconstruct(stored, index), bias)

    @property
    def decodes_at_load(self) -> bool:
        """Whether its runtime Linear is the decoded dense matrix (the default `linear`):
        larger in memory than the stored form."""
        return type(self).linear is Method.linear

    @classmethod
    def serves_structured(cls) -> bool:
        """Whether it fits structured groups (ffn / attn targets), serving them with
        `structured`."""
        return cls.structured is not Method.structured

    def structured(self, stored: Stored, index: int, original: nn.Module) -> nn.Module:
        """The module serving member `index` of a structured group (an ffn target: its
        MLP) in place of `original`, sharing the stored tensors (so refinement trains
        them). Only methods that fit such groups have one."""
        raise AecompressError(f"{self.name} does not serve structured groups")

    def embedding(self, stored: Stored, index: int, padding_idx: int | None) -> nn.Module:
        """The runtime module serving member `index` as an Embedding (default: decoded once)."""
        with torch.no_grad():
            return dense_embedding(self.reconstruct(stored, index), padding_idx)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    METHODS[cls.name] = cls
    return cls


def check_stage(method: Method, spec: GroupSpec) -> None:
    """Refuse a quantization stage for a method that stores no quantized tensors, and GPTQ
    settings for one whose stage runs no GPTQ they would set."""
    stage = spec.quantize
    if stage is not None and not method.quantizable:
        able = ", ".join(sorted(name for name, cls in METHODS.items() if cls.quantizable))
        raise AecompressError(
            f"{spec.name}: {method.name} cannot quantize its stored tensors "
            f"(quantize {stage}); methods that can: {able}"
        )
    if stage is not None and stage.custom_gptq_settings and not method.stage_runs_gptq():
        able = ", ".join(
            sorted(n for n, cls in METHODS.items() if make_method(n).stage_runs_gptq())
        )
        raise AecompressError(
            f"{spec.name}: {method.name}'s quantization stage runs no GPTQ that "
            f"{', '.join(stage.custom_gptq_settings)} would set; methods whose stage does: "
            f"{able}"
        )


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method with validated options."""
    if name not in METHODS:
        raise AecompressError(f"unknown method '{name}': use {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    try:
        return cls(cls.Options(**(options or {})))
    except ValidationError as error:
        raise AecompressError(describe(error, f"method '{name}' options")) from error
    except TypeError as error:
        raise AecompressError(f"method '{name}' options: {error}") from error
