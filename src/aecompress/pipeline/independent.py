"""The independent pipeline: every group fitted on statistics of the dense model.

One calibration pass (cached on disk) collects what all the methods need; then each group
is fitted on its own weights and swapped in. Nothing compensates the error that earlier
groups make: see the sequential pipeline for that.

Inside the blocks this is the sequential pipeline over one stage of every block whose
moments are all collected before any fit (the same numbers: both add inputs through
calibration.InputAccumulator). It stays one hooked pass of the whole model because its
statistics are a file cached for later runs (other ratios and methods of a sweep), and
reach what the block streams do not: targets outside the blocks (token counts of
embeddings, a head), models without recognised blocks, and gradients of the model's loss.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.calibration import CalibrationConfig, TargetStatistics, cached_statistics
from aecompress.compressed import CompressedGroup
from aecompress.pipeline.plan import (
    Metric,
    PlannedGroup,
    finite_matrices,
    fit_group,
    make_validate,
)
from aecompress.progress import progress_bar
from aecompress.substitution import inject


def dense_statistics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    planned: list[PlannedGroup],
    calibration: CalibrationConfig,
    base_sha256: str,
    *,
    only: frozenset[str] | None = None,
    progress: bool = True,
) -> dict[str, TargetStatistics] | None:
    """The statistics the planned methods ask for (those in `only`, if given) of every
    planned target in the dense model, by target name: one calibration pass, or its
    cached file (calibration.cached_statistics). None when none is asked for."""
    needed = set().union(*(p.method.statistics_needed() for p in planned))
    if only is not None:
        needed &= only
    if not needed:
        return None
    targets = [t for p in planned for t in p.group.members]
    return cached_statistics(
        model, tokenizer, targets, needed, calibration, base_sha256, progress=progress
    )


def run_independent(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    planned: list[PlannedGroup],
    *,
    calibration: CalibrationConfig,
    base_sha256: str,
    tied_output: str | None,
    seed: int,
    validation: Callable[[], Metric] | None = None,
    progress: bool = True,
) -> list[CompressedGroup]:
    """Fit every planned group in order and swap its modules in, deferred: each is built
    on its first call (a validation pass), so a run that is only saved never holds decoded
    copies of sparse or AE groups beside their stored tensors. `validation` prepares the
    metric a method may select by (see plan.make_validate)."""
    statistics = dense_statistics(
        model, tokenizer, planned, calibration, base_sha256, progress=progress
    )
    fitted_groups = []
    for plan in progress_bar(planned, desc="compress", enabled=progress):
        members = plan.group.members
        fitted = fit_group(
            plan,
            finite_matrices(model, members),
            None if statistics is None else [statistics[t.name] for t in members],
            seed=seed,
            validate=make_validate(model, plan.group, validation),
            progress=progress,
        )
        tied = tied_output if plan.group.family == "embed" else None
        inject(model, plan.group, plan.method, fitted.stored, tied, serving="deferred")
        fitted_groups.append(fitted)
    return fitted_groups
