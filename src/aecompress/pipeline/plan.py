"""Planning a compression: which method fits which group, within which budget; and the
one function that fits a planned group and checks what it stored."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import PreTrainedModel

from aecompress.calibration import TargetStatistics
from aecompress.compressed import CompressedGroup
from aecompress.errors import AecompressError
from aecompress.methods import METHODS, FitContext, GroupSpec, Method, check_stage, make_method
from aecompress.methods.stage import QuantStage
from aecompress.models import is_causal_lm
from aecompress.numerics import all_finite
from aecompress.recipe import Recipe
from aecompress.targets import (
    STRUCTURED_PARTS,
    Group,
    Target,
    covered_names,
    group_targets,
    head_dim,
    kv_heads,
    resolve_targets,
    spec_kind,
    weight_matrix,
)


@dataclass(frozen=True)
class PlannedGroup:
    """A group of targets, the method that will fit it, and its budget of stored bits."""

    group: Group
    method: Method
    spec: GroupSpec
    budget: float

    @property
    def ratio(self) -> float:
        return self.spec.dense_bits / self.budget


def group_spec(
    model: nn.Module,
    group: Group,
    head: int | None,
    dtype: str,
    quantize: QuantStage | None = None,
) -> GroupSpec:
    rows, cols = weight_matrix(model, group.members[0]).shape
    return GroupSpec(
        group.name,
        group.family,
        spec_kind(group.members[0]),
        len(group.members),
        rows,
        cols,
        head,
        dtype,
        quantize,
        kv_heads(model),
    )


def storage_dtype(recipe: Recipe, model: PreTrainedModel) -> str:
    """The recipe's storage dtype; `auto` is bfloat16 for causal LMs (measured to move
    WikiText-2 validation perplexity very little against float32 on SmolLM2's MLPs,
    benchmarks/results/compensation/report.md), float32 otherwise."""
    if recipe.storage_dtype != "auto":
        return recipe.storage_dtype
    return "bfloat16" if is_causal_lm(model) else "float32"


def plan_groups(model: PreTrainedModel, recipe: Recipe) -> list[PlannedGroup]:
    """Every group of the recipe with its method and a budget of the recipe's ratio (dense
    bits in the storage dtype over stored bits); each method checks its groups here,
    before any calibration or fitting work."""
    planned: list[PlannedGroup] = []
    claimed: dict[str, str] = {}
    head = head_dim(model)
    dtype = storage_dtype(recipe, model)
    for rule in recipe.rules():
        method = make_method(rule.method, rule.options)
        targets = resolve_targets(model, rule.targets)
        for name in (name for target in targets for name in covered_names(target)):
            if name in claimed:
                raise AecompressError(
                    f"{name} is a target of both {claimed[name]} and {rule.method}"
                )
            claimed[name] = rule.method
        for group in group_targets(model, targets, recipe.group):
            spec = group_spec(model, group, head, dtype, rule.quantize)
            check_stage(method, spec)
            check_structured(method, spec)
            method.check(spec)
            planned.append(PlannedGroup(group, method, spec, spec.dense_bits / recipe.ratio))
    return planned


def check_structured(method: Method, spec: GroupSpec) -> None:
    """Refuse a structured target (ffn: a whole MLP, attn: a whole attention) for a method
    that does not remove whole structures (before any calibration or fitting)."""
    if spec.kind in STRUCTURED_PARTS and not method.serves_structured():
        names = ", ".join(name for name, kind in METHODS.items() if kind.serves_structured())
        raise AecompressError(
            f"{spec.name}: {method.name} does not remove whole neurons or head dims; "
            f"--targets {spec.kind} takes {names} (or target its matrices one by one)"
        )


def finite_matrices(model: nn.Module, targets: Sequence[Target]) -> list[torch.Tensor]:
    """Copies of the targets' weights ([out, in], float32), refused if not finite."""
    matrices = [weight_matrix(model, t).float().clone() for t in targets]
    for target, matrix in zip(targets, matrices, strict=True):
        if not all_finite(matrix):
            raise AecompressError(
                f"{target.name} has NaN or infinite weights: refusing to compress"
            )
    return matrices


def fit_group(
    planned: PlannedGroup,
    matrices: list[torch.Tensor],
    statistics: Sequence[TargetStatistics] | None,
    *,
    seed: int,
    validate: Callable[[list[torch.Tensor]], float] | None = None,
    progress: bool = True,
    owns_statistics: bool = False,
) -> CompressedGroup:
    """Fit the planned method on `matrices` (the group's, or targets standing in for them),
    and check that it stored what its width costs, within budget, all finite."""
    method, spec = planned.method, planned.spec
    if statistics is not None:  # where the matrices are (cached statistics are on the CPU)
        statistics = [on_device(s, matrices[0].device) for s in statistics]
    context = FitContext(
        spec, planned.budget, seed, statistics, validate, progress, owns_statistics
    )
    width = method.solve_width(matrices, context)
    stored = method.fit(matrices, width, context).as_parameters()
    shape = (spec.rows, spec.cols)
    fitted = CompressedGroup(planned.group, method, stored, shape, spec.float_bits)
    declared = method.cost(stored.width, spec)
    if fitted.stored_bits != declared or declared > planned.budget:
        raise RuntimeError(
            f"method {method.name} stored {fitted.stored_bits} bits for {spec.name} "
            f"(its width costs {declared}; budget {planned.budget:.0f})"
        )
    for name, tensor in stored.tensors().items():
        if not all_finite(tensor):
            raise AecompressError(
                f"{method.name} produced non-finite values for {spec.name} ({name}): "
                "not saving them"
            )
    return fitted


def on_device(statistics: TargetStatistics, device: torch.device) -> TargetStatistics:
    """The statistics with every tensor on `device`."""
    moved = copy.copy(statistics)
    for field in fields(statistics):
        value = getattr(statistics, field.name)
        if isinstance(value, torch.Tensor):
            setattr(moved, field.name, value.to(device))
    return moved


@contextmanager
def swapped_weights(
    model: nn.Module, targets: Sequence[Target], matrices: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Temporarily put dense `matrices` ([out, in]) in place of the targets' weights."""
    live = [weight_matrix(model, t) for t in targets]
    for target, weight, matrix in zip(targets, live, matrices, strict=True):
        if weight.shape != matrix.shape:
            raise ValueError(f"{target.name}: got {tuple(matrix.shape)}, is {tuple(weight.shape)}")
    saved = [w.clone() for w in live]
    try:
        with torch.no_grad():
            for weight, matrix in zip(live, matrices, strict=True):
                weight.copy_(matrix)
        yield
    finally:
        with torch.no_grad():
            for weight, original in zip(live, saved, strict=True):
                weight.copy_(original)


Metric = Callable[[], float]  # the model's validation metric as it stands, lower is better


def make_validate(
    model: nn.Module, group: Group, validation: Callable[[], Metric] | None
) -> Callable[[list[torch.Tensor]], float] | None:
    """context.validate for a group: the metric that `validation` prepares (on first use,
    so unused it costs nothing) with the group's matrices replaced by the given dense
    ones; None without `validation` (a method that selects by it then says so)."""
    if validation is None:
        return None
    metric: Metric | None = None

    def validate(matrices: list[torch.Tensor]) -> float:
        nonlocal metric
        if metric is None:
            metric = validation()
        with swapped_weights(model, group.members, matrices):
            return metric()

    return validate
