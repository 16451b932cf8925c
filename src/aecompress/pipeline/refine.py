"""Block refinement: after a stage's groups are fitted, their stored float tensors (factors,
codes, decoders, kept values with the positions fixed) are trained with Adam so that the
stage's output on the compressed stream matches the dense stage's output on the dense
stream. Some calibration windows are held out: training stops when their error stops
falling, and the best state on them is kept (never worse than the fit it starts from).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from aecompress.compressed import CompressedGroup
from aecompress.pipeline.streams import BlockInputs, Streams, run_blocks
from aecompress.progress import progress_bar
from aecompress.recipe import RefineConfig
from aecompress.substitution import inject

logger = logging.getLogger(__name__)


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _stored_parameters(groups: Sequence[CompressedGroup]) -> list[nn.Parameter]:
    found: dict[int, nn.Parameter] = {}
    for group in groups:
        for tensor in group.stored.tensors().values():
            if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                found[id(tensor)] = tensor
    return list(found.values())


def refine_stage(
    model: nn.Module,
    live: Sequence[nn.Module],
    dense: Sequence[nn.Module],
    groups: Sequence[CompressedGroup],
    streams: Streams,
    config: RefineConfig,
    *,
    seed: int,
    progress: bool = True,
) -> None:
    """Train the groups' stored tensors on the stage's output error (module docstring),
    then serve the groups with their runtime modules again."""
    count = len(streams.compressed)
    held = max(1, round(config.holdout * count))
    params = _stored_parameters(groups)
    if not params:
        return
    if count < 2:
        logger.warning("block refinement needs two calibration batches or more: skipped")
        return
    with torch.no_grad():
        targets = [
            run_blocks(dense, hidden, extra)
            for hidden, extra in zip(streams.dense_states(), streams.inputs, strict=True)
        ]
    pairs = list(zip(streams.compressed, streams.inputs, strict=True))
    inputs, held_inputs = pairs[: count - held], pairs[count - held :]
    targets, held_targets = targets[: count - held], targets[count - held :]
    flags = {p: p.requires_grad for block in live for p in block.parameters()}
    for param in flags:
        param.requires_grad_(False)
    for group in groups:
        for param in _stored_parameters([group]):
            param.requires_grad_(True)
        inject(model, group.group, group.method, group.stored, serving="trainable")

    def held_out_error() -> float:
        with torch.no_grad():
            errors = [
                _relative_error(run_blocks(live, hidden, extra), target).item()
                for (hidden, extra), target in zip(held_inputs, held_targets, strict=True)
            ]
        return sum(errors) / len(errors)

    batches: list[tuple[torch.Tensor, BlockInputs]] = inputs

    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(params, lr=config.lr)
    start = best_error = held_out_error()
    best = [p.detach().clone() for p in params]
    stale, steps = 0, 0
    bar = progress_bar(range(config.steps), desc="refine", enabled=progress)
    try:
        for step in bar:
            index = int(torch.randint(len(batches), (1,), generator=generator))
            (hidden, extra), target = batches[index], targets[index]
            loss = _relative_error(run_blocks(live, hidden, extra), target)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps = step + 1
            if steps % config.eval_every and steps != config.steps:
                continue
            error = held_out_error()
            bar.set_postfix(held_out=f"{error:.4g}")
            if error < best_error:
                best_error, best, stale = error, [p.detach().clone() for p in params], 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    finally:
        with torch.no_grad():
            for param, value in zip(params, best, strict=True):
                param.copy_(value)
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for group in groups:
            for param in _stored_parameters([group]):
                param.requires_grad_(True)
            inject(model, group.group, group.method, group.stored)
    summary = {
        "steps": steps,
        "held_out_before": round(start, 6),
        "held_out_after": round(best_error, 6),
    }
    for group in groups:
        group.stored.info["refine"] = summary
    if not math.isfinite(best_error):
        raise RuntimeError("block refinement produced a non-finite error")
