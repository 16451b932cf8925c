"""The sequential pipeline: blocks compressed in order, each on the inputs that the blocks
before it produce as already compressed, and fitted to what the dense model computes.

Two hidden-state streams run over the calibration windows side by side: the compressed
one (blocks 0..i-1 as compressed) and the dense one (the original model), the latter only
when something reads it (the dense target, block refinement). Targets outside
the blocks (token embeddings and a tied head) are fitted first, on dense statistics.
Then each stage (one block, or the adjacent blocks a stacked group spans) is processed
position by position (q, k, v; o; up, gate; down: the modules that read one input): a pass
of both streams up to the position collects, per target, the compressed-stream Gram
H = X_c^T X_c (and, for the dense target, the cross moment C = X_d^T X_c), then its groups
are fitted and swapped in. With granularity `block` (the default) the positions go in
reverse forward order, so each pass runs only through positions not yet compressed: every
layer is calibrated on the stage as it was (llm-compressor's one pass per block), while
the statistics held at once are no more than the largest position's (`passes`). With
`layer` they go in forward order, and each position sees the outputs of the compressed
ones before it. With
the `local` target (the default) a method that measures output error (it asks for `xtx`)
fits the layer's own weights under the compressed inputs' H, as GPTQ and SparseGPT do.
With the `dense` target it fits the compensated target

    W' = W (C + lambda I) (H + lambda I)^-1

under X^T X = H: minimising its ||(W' - W_hat) L||, L L^T = H, is minimising
||X_c W_hat^T - X_d W^T||^2 (up to the small ridge lambda, which keeps W' at W in directions
the inputs never take), i.e. the error against the dense layer's output on the dense
stream, including what the blocks before lost (lambda = `damp` times the mean diagonal of
H). On SmolLM2's MLPs the dense target measured worse on WikiText-2 validation than the
local one, for svdllm even worse than the independent pipeline
(benchmarks/results/compensation/report.md):
regressing on the upstream error with 16k calibration tokens overfits them. Other methods
fit the weights as they are; every method gets H itself as X^T X (the
methods add their own ridge: a large one would flatten the metric of heavy-tailed
activations towards the plain Frobenius norm). After a
stage, optional block refinement trains its stored tensors on the stage's output error
(pipeline/refine.py); then both streams move past it and its statistics are freed, so the
working set is one stage's statistics (and its dense copy) and the streams' hidden states.
Streamed (BlockStream), the model's weights are not in memory either: each stage's blocks
are read from disk before it and freed after it, its tensors written out.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.calibration import (
    GRADIENT_STATISTICS,
    CalibrationConfig,
    InputAccumulator,
    InputMoments,
    TargetStatistics,
    calibration_windows,
)
from aecompress.compressed import CompressedGroup
from aecompress.errors import AecompressError
from aecompress.memory import trim_heap
from aecompress.pipeline.independent import dense_statistics, run_independent
from aecompress.pipeline.plan import (
    Metric,
    PlannedGroup,
    finite_matrices,
    fit_group,
    make_validate,
)
from aecompress.pipeline.refine import refine_stage
from aecompress.pipeline.streams import (
    BlockInputs,
    Streams,
    advance,
    capture_block_inputs,
    capturing,
    run_blocks,
    run_until_stop,
)
from aecompress.progress import progress_bar
from aecompress.recipe import RefineConfig, SequentialConfig
from aecompress.streaming import BlockSource
from aecompress.substitution import inject
from aecompress.targets import STRUCTURED_PARTS, Target, output_head_path, transformer_blocks


def compensated(moments: InputMoments, weight: torch.Tensor, damp: float) -> torch.Tensor:
    """W (C + lambda I) (H + lambda I)^-1 from a target's moments (H = gram, C = cross; see
    the module docstring), float32."""
    assert moments.gram is not None and moments.cross is not None
    ridge = damp * moments.gram.diagonal().mean().clamp_min(1e-12).item()
    damped = moments.gram.clone()
    damped.diagonal().add_(ridge)
    transposed = weight.double().T
    rhs = moments.cross.T @ transposed
    rhs += ridge * transposed
    return torch.linalg.solve(damped, rhs).T.float()


@dataclass
class Stage:
    """Adjacent blocks compressed together, with their planned groups."""

    first: int
    last: int
    groups: list[PlannedGroup] = field(default_factory=list)

    @property
    def indices(self) -> range:
        return range(self.first, self.last + 1)


@dataclass
class BlockStream:
    """Streamed compression: the model is a skeleton (streaming.py) whose modules outside
    the blocks `source` fills before the blocks' inputs are captured (all but an output
    head that nothing targets or ties) and empties after, and each stage's blocks before
    the stage and after it. `finished(groups, stage)` takes the groups fitted outside the
    blocks (stage None), then each stage's, once the streams have passed them and before
    their blocks are emptied (to write their tensors and free the stored ones)."""

    source: BlockSource
    device: torch.device
    finished: Callable[[list[CompressedGroup], Stage | None], None]

    def outside_paths(self, model: PreTrainedModel, outside: list[PlannedGroup]) -> list[str]:
        """The modules outside the blocks to fill: every one but the output head when it
        is neither tied to the embedding nor targeted (it runs after the blocks only)."""
        head = model.get_output_embeddings()
        path = next((p for p, m in model.named_modules() if head is not None and m is head), None)
        targeted = {t.path for plan in outside for t in plan.group.members}
        skip = path if output_head_path(model) is None and path not in targeted else None
        return [p for p in self.source.outside_paths() if p != skip]


def _layer(target: Target, blocks_path: str) -> int | None:
    prefix = f"{blocks_path}."
    if target.layer is None or not target.path.startswith(prefix):
        return None
    return target.layer


def plan_stages(
    planned: list[PlannedGroup], blocks_path: str, count: int
) -> tuple[list[PlannedGroup], list[Stage]]:
    """Groups outside the blocks, and the stages: runs of adjacent blocks that no group
    straddles (a block without targets is a stage of its own, run only to move on)."""
    outside, spans = [], []
    for plan in planned:
        layers = [_layer(t, blocks_path) for t in plan.group.members]
        if any(layer is None for layer in layers):
            outside.append(plan)
            continue
        found = [layer for layer in layers if layer is not None]
        spans.append((min(found), max(found), plan))
    stages = [Stage(i, i) for i in range(count)]
    for first, last, plan in spans:
        merged = [s for s in stages if s.last >= first and s.first <= last]
        start, end = merged[0].first, merged[-1].last
        groups = [g for s in merged for g in s.groups] + [plan]
        stages = [s for s in stages if s not in merged] + [Stage(start, end, groups)]
        stages.sort(key=lambda s: s.first)
    return outside, stages


def _relative(target: Target, blocks_path: str) -> tuple[int, str]:
    assert target.layer is not None
    return target.layer, target.path.removeprefix(f"{blocks_path}.{target.layer}.")


def forward_positions(
    blocks: Sequence[nn.Module],
    stage: Stage,
    blocks_path: str,
    hidden: torch.Tensor,
    inputs: BlockInputs,
) -> list[list[PlannedGroup]]:
    """The stage's groups by position: groups whose modules read the same input tensor share
    a position, positions in the order the forward pass reaches them."""
    relative = {
        t.path: _relative(t, blocks_path) for plan in stage.groups for t in plan.group.members
    }
    modules = {
        path: blocks[layer - stage.first].get_submodule(rest)
        for path, (layer, rest) in relative.items()
    }
    with torch.no_grad(), capturing(modules, stop_when_complete=False) as seen:
        run_blocks(blocks, hidden, inputs)
    order: dict[tuple[int, int], int] = {}  # (block, id of input) -> position in its block
    position: dict[str, int] = {}
    for path, tensor in seen.items():  # insertion order = forward order
        block = relative[path][0]
        key = (block, id(tensor))
        if key not in order:
            order[key] = sum(1 for b, _ in order if b == block)
        position[path] = order[key]
    by_position: dict[int, list[PlannedGroup]] = {}
    for plan in stage.groups:
        places = {position[t.path] for t in plan.group.members}
        if len(places) != 1:
            raise AecompressError(f"{plan.group.name}: its layers read different positions")
        by_position.setdefault(places.pop(), []).append(plan)
    return [by_position[p] for p in sorted(by_position)]


def passes(positions: list[list[PlannedGroup]], granularity: str) -> list[list[PlannedGroup]]:
    """The groups of each pass through a stage, in the order they are fitted. `layer`: a
    pass per position, in forward order. `block`: the positions from last to first, a
    pass ending at the last position it holds, so it only goes through positions not yet
    compressed; positions share a pass while their X^T X together are no larger than the
    largest position's alone (Llama: down, then up, gate, o, q, k, v from one more pass)."""
    if granularity == "layer":
        return positions
    sizes = [_statistics_numbers(groups) for groups in positions]
    largest = max(sizes)
    found: list[list[PlannedGroup]] = []
    held = 0
    for groups, size in zip(reversed(positions), reversed(sizes), strict=True):
        if not found or held + size > largest:
            found.append([])
            held = 0
        found[-1] += groups
        held += size
    return found


def _statistics_numbers(groups: list[PlannedGroup]) -> int:
    """Numbers in a position's X^T X: one [in, in] per block it spans."""
    layers = {target.layer for plan in groups for target in plan.group.members}
    return len(layers) * max(plan.spec.input_width for plan in groups) ** 2


def collect_moments(
    live: Sequence[nn.Module],
    dense: Sequence[nn.Module] | None,
    stage: Stage,
    groups: list[PlannedGroup],
    blocks_path: str,
    streams: Streams,
) -> dict[str, InputMoments]:
    """Input moments of every module the groups target (the cross moment too when the
    dense stream is given: some group compensates), from one pass of both streams per
    batch, each pass ending once its inputs are seen."""
    relative = {t.path: _relative(t, blocks_path) for plan in groups for t in plan.group.members}
    accumulator = InputAccumulator(relative)

    def modules(blocks: Sequence[nn.Module]) -> dict[str, nn.Module]:
        return {
            p: blocks[layer - stage.first].get_submodule(r) for p, (layer, r) in relative.items()
        }

    for index, hidden in enumerate(streams.compressed):
        dense_inputs: dict[str, torch.Tensor] = {}
        if dense is not None:
            with torch.no_grad(), capturing(modules(dense)) as dense_inputs:
                run_until_stop(dense, streams.dense_states()[index], streams.inputs[index])
        with torch.no_grad(), capturing(modules(live)) as live_inputs:
            run_until_stop(live, hidden, streams.inputs[index])
        accumulator.new_pass()
        for path in relative:
            accumulator.add(path, live_inputs[path], dense_inputs.get(path))
    return accumulator.moments


def compensates(plan: PlannedGroup) -> bool:
    """Whether the group's method measures output error (it asks for X^T X)."""
    return "xtx" in plan.method.statistics_needed() and plan.spec.kind != "embedding"


def fit_position(
    model: PreTrainedModel,
    groups: list[PlannedGroup],
    moments: dict[str, InputMoments],
    gradients: dict[str, TargetStatistics] | None,
    config: SequentialConfig,
    *,
    seed: int,
    validation: Callable[[], Metric] | None,
    progress: bool,
) -> list[CompressedGroup]:
    """Fit each group on its (compensated) matrices and statistics, and swap it in."""
    fitted = []
    for position, plan in enumerate(groups):
        members = plan.group.members
        matrices = finite_matrices(model, members)
        statistics = []
        for index, target in enumerate(members):
            entry = moments[target.path]
            stats = entry.statistics()
            if gradients is not None:
                stats.fisher, stats.l1 = gradients[target.name].fisher, gradients[target.name].l1
            statistics.append(stats)
            if compensates(plan) and config.target == "dense":
                if plan.spec.kind in STRUCTURED_PARTS:
                    raise AecompressError(
                        f"{plan.group.name}: the dense sequential target is for linear "
                        f"layers; {plan.spec.kind} targets refit on their own (target local)"
                    )
                matrices[index] = compensated(entry, matrices[index], config.damp)
        last_reader = _last_reader(plan, groups[position + 1 :], moments)
        group = fit_group(
            plan,
            matrices,
            statistics,
            seed=seed,
            validate=make_validate(model, plan.group, validation),
            progress=progress,
            owns_statistics=last_reader,
        )
        if last_reader:  # free X^T X (factorised where it lay) before the next fit
            for target in members:
                moments[target.path].gram = None
            del statistics
        # built when the stage next runs: no decoded copy beside the fits still to come
        inject(model, plan.group, plan.method, group.stored, serving="deferred")
        fitted.append(group)
    return fitted


def _last_reader(
    plan: PlannedGroup, later: list[PlannedGroup], moments: dict[str, InputMoments]
) -> bool:
    """Whether no later group reads the X^T X of `plan`'s members (q, k, v share one)."""
    grams = {id(moments[t.path].gram) for t in plan.group.members}
    return not any(id(moments[t.path].gram) in grams for p in later for t in p.group.members)


def run_sequential(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    planned: list[PlannedGroup],
    *,
    calibration: CalibrationConfig,
    config: SequentialConfig,
    refine: RefineConfig,
    base_sha256: str,
    tied_output: str | None,
    seed: int,
    validation: Callable[[], Metric] | None = None,
    progress: bool = True,
    stream: BlockStream | None = None,
) -> list[CompressedGroup]:
    """Fit every planned group block by block (see the module docstring); `validation`
    prepares the metric a method may select by (see plan.make_validate); with `stream`
    the model's weights come from disk a block at a time (see BlockStream)."""
    found = transformer_blocks(model)
    if found is None:
        raise AecompressError(
            f"{type(model).__name__}: no transformer blocks found for the sequential "
            "pipeline: use --pipeline independent"
        )
    if tokenizer is None:
        raise AecompressError("the sequential pipeline needs the model's tokenizer")
    blocks_path, blocks = found
    outside, stages = plan_stages(planned, blocks_path, len(blocks))
    # Fisher / L1 need the whole model's loss: one pass of the dense model, before any fit
    gradients = dense_statistics(
        model,
        tokenizer,
        planned,
        calibration,
        base_sha256,
        only=GRADIENT_STATISTICS,
        progress=progress,
    )
    windows = calibration_windows(tokenizer, calibration)
    keep_dense = refine.steps > 0 or (
        config.target == "dense" and any(compensates(plan) for plan in planned)
    )
    outside_paths = stream.outside_paths(model, outside) if stream else []
    if stream:
        stream.source.load_outside(outside_paths, stream.device)
    dense_hidden = None
    if keep_dense:
        dense_hidden, _ = capture_block_inputs(model, blocks[0], windows, calibration.batch_size)
    fitted = run_independent(  # targets outside the blocks: dense statistics
        model,
        tokenizer,
        outside,
        calibration=calibration,
        base_sha256=base_sha256,
        tied_output=tied_output,
        seed=seed,
        validation=validation,
        progress=progress,
    )
    compressed_hidden, inputs = capture_block_inputs(
        model, blocks[0], windows, calibration.batch_size
    )
    streams = Streams(compressed_hidden, dense_hidden, inputs)
    if stream:
        stream.finished(fitted, None)
        stream.source.release_outside(outside_paths)
    for stage in progress_bar(stages, desc="compress (sequential)", enabled=progress):
        if stream:
            for index in stage.indices:
                stream.source.load(index, stream.device)
        live = list(blocks[stage.first : stage.last + 1])
        copied = keep_dense and stage.groups
        dense = [copy.deepcopy(block) for block in live] if copied else live
        stage_groups: list[CompressedGroup] = []
        if stage.groups:
            positions = forward_positions(
                live, stage, blocks_path, streams.compressed[0], inputs[0]
            )
            for groups in passes(positions, config.granularity):
                needs_dense = config.target == "dense" and any(compensates(g) for g in groups)
                moments = collect_moments(
                    live, dense if needs_dense else None, stage, groups, blocks_path, streams
                )
                stage_groups += fit_position(
                    model,
                    groups,
                    moments,
                    gradients,
                    config,
                    seed=seed,
                    validation=validation,
                    progress=progress,
                )
                del moments
            if refine.steps:
                refine_stage(
                    model, live, dense, stage_groups, streams, refine, seed=seed, progress=progress
                )
        advance(live, dense, streams)
        for group in stage_groups:  # never run again while compressing: free decoded copies
            inject(model, group.group, group.method, group.stored, serving="deferred")
        fitted += stage_groups
        del live, dense  # a dense copy of the stage: not beside the next one
        if stream:
            stream.finished(stage_groups, stage)
            for index in stage.indices:
                stream.source.release(index)
            trim_heap()
    order = {id(plan.group): index for index, plan in enumerate(planned)}
    return sorted(fitted, key=lambda g: order[id(g.group)])
