"""The peak memory a compress run expects, from the model's shapes alone (a skeleton on the
meta device, models.model_skeleton: no weight loaded) and the recipe, on the in-memory
path (the whole model in fp32) or streamed (one stage's blocks at a time).

The parts, in bytes, each at its largest while a stage is fitted (the peak: where they
meet; every part but `weights` is the same on both paths):
- runtime: the process's floor (torch, transformers and aecompress imported, the tokenizer,
  the calibration text's token ids);
- weights: the model in fp32 (in memory); streamed, the stage's blocks in fp32 or, while
  the blocks' inputs are captured, the modules outside the blocks but an untouched output
  head, whichever is larger, and one tensor being read;
- dense_copy: the stage's blocks copied for the dense stream (refinement, dense target);
- hidden_states: the calibration windows' hidden states entering a block, per stream
  kept (refinement also keeps the dense stage's outputs);
- statistics: the float64 X^T X (and cross moments, dense target) held at once: the
  sequential pipeline's pass whose step peaks (pipeline/sequential.py `passes`: a position
  is the inputs one block reads once, q k v; o; up gate; down; an ffn target's is the
  intermediate activations), or every target's at once (independent pipeline);
- workspace: beside them, either one calibration batch through one block while a pass
  collects them (each linear layer's output, attention scores; with the backward pass's
  when refining), or a fit: float32 copies of the group's matrices and, for a method
  that factorises X^T X (it asks for `xtx`: sparsegpt, gptq, svdllm...), a float64
  factor when a later group reads the same X^T X (else it factorises in place); the two
  never meet, the one that peaks with the statistics held then is counted;
- stored: the stage's stored tensors before they are written;
- loading (in memory): what loading the whole model holds beyond all of the above but
  runtime and weights, when that is more: the checkpoint's pages while its tensors are
  converted to fp32 (a bf16 checkpoint: half the fp32 bytes) and one converted tensor.
Methods with their own training (the AE family), gradient statistics (Fisher, L1) and the
sensitivity allocation need more than this counts (SmolLM2-135M's MLPs, sparsegpt + int3
allocated: 2.8 GiB measured against 1.07 expected); the estimate says so in `notes`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from aecompress.calibration import GRADIENT_STATISTICS
from aecompress.engine import choose_pipeline
from aecompress.errors import AecompressError
from aecompress.pipeline.plan import PlannedGroup, plan_groups
from aecompress.pipeline.sequential import Stage, compensates, passes, plan_stages
from aecompress.recipe import Recipe
from aecompress.targets import (
    FAMILIES,
    Target,
    structured_matrices,
    transformer_blocks,
    weight_matrix,
)

GIB = 2**30
FLOAT32, FLOAT64 = 4, 8
RUNTIME_BYTES = int(0.45 * GIB)  # calibrated: see benchmarks/results/scale.md
MATRIX_COPIES = 3  # float32 copies of a group's matrices while it is fitted (calibrated)
HIDDEN_COPIES = 4  # hidden-size activations of a block per token (residual, norms, ...)
SHARED_INPUT = {"k": "q", "v": "q", "attn": "q", "gate": "up"}  # families that read another's input
ESCAPE_OPTION = "--ignore-memory-estimate"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part at the run's peak (module docstring); `total` is their sum."""

    streamed: bool
    pipeline: str
    runtime: int
    weights: int
    dense_copy: int
    hidden_states: int
    statistics: int
    workspace: int
    stored: int
    loading: int
    notes: tuple[str, ...] = ()

    def parts(self) -> dict[str, int]:
        skipped = {"streamed", "pipeline", "notes"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    @property
    def path(self) -> str:
        return "streamed" if self.streamed else "in memory"


def estimate_memory(model: PreTrainedModel, recipe: Recipe, *, streamed: bool) -> MemoryEstimate:
    """The peak of compressing `model` (a skeleton is enough: shapes only) as `recipe`
    says, in the pipeline the run takes (streaming is always sequential)."""
    planned = plan_groups(model, recipe)
    pipeline = "sequential" if streamed else choose_pipeline(recipe, planned, model)
    found = transformer_blocks(model)
    sequential = pipeline == "sequential"
    if sequential and found is None:
        raise AecompressError(f"{type(model).__name__}: no transformer blocks to estimate")
    blocks_path, blocks = found if found is not None else ("", nn.ModuleList())
    outside, stages = plan_stages(planned, blocks_path, len(blocks)) if sequential else ([], [])
    keep_dense = recipe.refine.steps > 0 or (
        recipe.sequential.target == "dense" and any(compensates(p) for p in planned)
    )
    activations = _activation_bytes(model, blocks, recipe)
    held, workspace = (
        _sequential_peak(model, outside, stages, recipe, keep_dense, activations)
        if sequential
        else _independent_peak(model, planned, activations)
    )
    stage = max(stages, key=lambda s: _stage_bytes(blocks, s), default=None)
    stage_bytes = 0 if stage is None else _stage_bytes(blocks, stage)
    weights = _parameter_bytes(model)
    if streamed:
        inside = sum(_parameter_bytes(block) for block in blocks)
        outside_held = weights - inside - _untouched_head_bytes(model, planned)
        weights = max(outside_held, stage_bytes) + _largest_tensor_bytes(blocks)
    windows = recipe.calibration.samples * recipe.calibration.seq_len
    streams = 1 + keep_dense + (recipe.refine.steps > 0)
    working = {
        "dense_copy": stage_bytes if keep_dense else 0,
        "hidden_states": streams * windows * _hidden_size(model) * FLOAT32,
        "statistics": held,
        "workspace": workspace,
        "stored": max((_stored_bytes(stage.groups) for stage in stages), default=0)
        if sequential
        else _stored_bytes(planned),
    }
    loading = 0 if streamed else _loading_bytes(model) - sum(working.values())
    return MemoryEstimate(
        streamed=streamed,
        pipeline=pipeline,
        runtime=RUNTIME_BYTES,
        weights=weights,
        **working,
        loading=max(0, loading),
        notes=_notes(planned, recipe),
    )


def _loading_bytes(model: PreTrainedModel) -> int:
    """Beside the fp32 model while it is loaded whole: the pages of a checkpoint in another
    dtype (mapped while every tensor is converted) and one converted tensor."""
    stored = getattr(model.config, "dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    numbers = _parameter_bytes(model) // FLOAT32
    pages = 0 if stored == torch.float32 else numbers * stored.itemsize
    return pages + _largest_tensor_bytes(model)


def _notes(planned: list[PlannedGroup], recipe: Recipe) -> tuple[str, ...]:
    notes = []
    if any(p.method.statistics_needed() & GRADIENT_STATISTICS for p in planned):
        notes.append("gradient statistics (Fisher / L1) hold the whole model's gradients too")
    if recipe.allocate == "sensitivity":
        notes.append(
            "the sensitivity allocation's backward pass and every target's X^T X held at once"
        )
    if any(p.method.name.startswith("ae") for p in planned):
        notes.append("the AE's training workspace")
    return tuple(notes)


def _parameter_bytes(module: nn.Module) -> int:
    """fp32 bytes of a module's parameters and buffers (shared tensors once)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() for t in tensors.values()) * FLOAT32


def _untouched_head_bytes(model: PreTrainedModel, planned: list[PlannedGroup]) -> int:
    """fp32 bytes of an output head neither tied to the embedding nor targeted: streaming
    never loads it (it runs after the blocks only)."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if head is None or getattr(head, "weight", None) is getattr(embedding, "weight", None):
        return 0
    targeted = {t.path for plan in planned for t in plan.group.members}
    path = next((p for p, m in model.named_modules() if m is head), None)
    return 0 if path in targeted else _parameter_bytes(head)


def _largest_tensor_bytes(module: nn.Module) -> int:
    """fp32 bytes of the largest parameter: a streamed block's tensors are read one at a
    time (in the file's dtype, at most fp32) and upcast."""
    return max((p.numel() for p in module.parameters()), default=0) * FLOAT32


def _stage_bytes(blocks: nn.ModuleList, stage: Stage) -> int:
    return sum(_parameter_bytes(blocks[i]) for i in range(stage.first, stage.last + 1))


def _hidden_size(model: PreTrainedModel) -> int:
    size = getattr(model.config, "hidden_size", None)
    if not isinstance(size, int):
        raise AecompressError(f"{type(model).__name__}: its config names no hidden_size")
    return size


def _activation_bytes(model: PreTrainedModel, blocks: nn.ModuleList, recipe: Recipe) -> int:
    """One batch through the widest block: its widest linear output three times (a gated
    MLP's up, gate and their product) and hidden-size tensors around them, attention
    scores; twice that when refining (a backward pass keeps them)."""
    batch = min(recipe.calibration.batch_size, recipe.calibration.samples)
    tokens = batch * recipe.calibration.seq_len
    widest = max((_widest_output(block) for block in blocks), default=0)
    heads = getattr(model.config, "num_attention_heads", 0) or 0
    scores = batch * heads * recipe.calibration.seq_len**2
    numbers = tokens * (3 * widest + HIDDEN_COPIES * _hidden_size(model)) + scores
    return numbers * FLOAT32 * (2 if recipe.refine.steps else 1)


def _widest_output(block: nn.Module) -> int:
    """The most output features of a Linear / Conv1D of the block."""
    widths = [m.out_features for m in block.modules() if isinstance(m, nn.Linear)]
    widths += [m.nf for m in block.modules() if isinstance(m, Conv1D)]
    return max(widths, default=0)


def _input_width(model: nn.Module, target: Target) -> int:
    """Columns of the target's X^T X: its module's input features (an ffn target's: the
    down projection's, the intermediate activations)."""
    if target.kind == "ffn":
        return structured_matrices(model, target)[2].shape[1]
    return weight_matrix(model, target).shape[1]


def _input_key(target: Target) -> tuple[int | None, str]:
    """Which input a target reads: one per (layer, position) (q, k and v share one)."""
    if target.family not in FAMILIES:
        return target.layer, target.path
    return target.layer, SHARED_INPUT.get(target.family, target.family)


def _factorises(plan: PlannedGroup) -> bool:
    return "xtx" in plan.method.statistics_needed() and plan.spec.kind != "embedding"


def _matrix_bytes(plan: PlannedGroup) -> int:
    return plan.spec.numel * FLOAT32 * MATRIX_COPIES


def _stored_bytes(planned: list[PlannedGroup]) -> int:
    return int(sum(plan.budget for plan in planned) / 8)


def _gram_bytes(model: nn.Module, groups: list[PlannedGroup], cross: bool) -> dict[object, int]:
    """Bytes of each X^T X the groups read, by input (float64; with the cross moment)."""
    grams: dict[object, int] = {}
    for plan in groups:
        for target in plan.group.members:
            width = _input_width(model, target)
            grams[_input_key(target)] = width * width * FLOAT64 * (2 if cross else 1)
    return grams


def _positions(stage: Stage) -> list[list[PlannedGroup]]:
    """The stage's groups by the input they read, in forward order (as the sequential
    pipeline finds them by running the stage; here from the families)."""
    by_input: dict[str, list[PlannedGroup]] = {}
    for plan in stage.groups:
        by_input.setdefault(_input_key(plan.group.members[0])[1], []).append(plan)
    order = {family: index for index, family in enumerate(FAMILIES)}
    return [by_input[key] for key in sorted(by_input, key=lambda k: order.get(k, len(order)))]


def _sequential_peak(
    model: nn.Module,
    outside: list[PlannedGroup],
    stages: list[Stage],
    recipe: Recipe,
    keep_dense: bool,
    activations: int,
) -> tuple[int, int]:
    """(statistics, workspace) where their sum peaks: a pass collects its inputs' X^T X
    with one batch's activations, then fits its groups in order, each X^T X freed after
    the last group that reads it, each fit with its workspace."""
    best = (0, max((_matrix_bytes(plan) for plan in outside), default=0))
    cross = keep_dense and recipe.sequential.target == "dense"
    for stage in stages:
        if not stage.groups:
            continue
        for groups in passes(_positions(stage), recipe.sequential.granularity):
            grams = _gram_bytes(model, groups, cross and any(compensates(g) for g in groups))
            held = sum(grams.values())
            steps = [(held, activations)]
            for index, plan in enumerate(groups):
                keys = {_input_key(t) for t in plan.group.members}
                later = {_input_key(t) for p in groups[index + 1 :] for t in p.group.members}
                factor = sum(grams[k] for k in keys & later) if _factorises(plan) else 0
                steps.append((held, _matrix_bytes(plan) + factor))
                held -= sum(grams[k] for k in keys - later)
            best = max([best, *steps], key=sum)
    return best


def _independent_peak(
    model: nn.Module, planned: list[PlannedGroup], activations: int
) -> tuple[int, int]:
    """(statistics, workspace): every target's X^T X from one pass of the dense model, held
    while each group is fitted on a copy."""
    readers = [plan for plan in planned if "xtx" in plan.method.statistics_needed()]
    held = sum(_gram_bytes(model, readers, cross=False).values())
    factors = [
        max(_gram_bytes(model, [plan], cross=False).values()) if _factorises(plan) else 0
        for plan in planned
    ]
    fits = [_matrix_bytes(p) + f for p, f in zip(planned, factors, strict=True)]
    return held, max([activations, *fits])


def describe(estimates: list[MemoryEstimate]) -> str:
    """A short table: one column per estimate (its path and pipeline), one row per part,
    GiB."""
    header = "| part | " + " | ".join(e.path for e in estimates) + " |"
    lines = [header, "|---|" + "---:|" * len(estimates)]
    lines.append("| pipeline | " + " | ".join(e.pipeline for e in estimates) + " |")
    for name in estimates[0].parts():
        lines.append(f"| {name} | " + " | ".join(_gib(e.parts()[name]) for e in estimates) + " |")
    lines.append("| **total** | " + " | ".join(f"**{_gib(e.total)}**" for e in estimates) + " |")
    notes = sorted({note for e in estimates for note in e.notes})
    return "\n".join(lines + [f"not counted: {note}" for note in notes])


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


def check_fits(estimate: MemoryEstimate, available: int | None, hint: str = "") -> None:
    """Refuse (one line) a run whose estimated peak exceeds the available memory; nothing
    to check when the available memory is unknown."""
    if available is None or estimate.total <= available:
        return
    raise AecompressError(
        f"compressing {estimate.path} needs about {_gib(estimate.total)} at its peak and "
        f"{_gib(available)} is available{hint}; see the parts with --dry-run, or pass "
        f"{ESCAPE_OPTION} to run anyway"
    )
