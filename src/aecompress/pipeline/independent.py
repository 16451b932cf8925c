"""The independent pipeline: every group fitted on statistics of the dense model.

One calibration pass (cached on disk) collects what all the methods need; then each group
is fitted on its own weights and swapped in. Nothing compensates the error that earlier
groups make: see the sequential pipeline for that.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.artifact import CompressedGroup
from aecompress.calibration import CalibrationConfig, cached_statistics
from aecompress.pipeline.plan import (
    Metric,
    PlannedGroup,
    finite_matrices,
    fit_group,
    make_validate,
)
from aecompress.substitution import inject


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
    needed = set().union(*(p.method.statistics_needed() for p in planned))
    statistics = None
    if needed:
        targets = [t for p in planned for t in p.group.members]
        statistics = cached_statistics(
            model, tokenizer, targets, needed, calibration, base_sha256, progress=progress
        )
    fitted_groups = []
    for plan in tqdm(planned, desc="compress", disable=not progress):
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
