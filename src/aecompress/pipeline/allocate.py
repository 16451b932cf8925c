"""Budget allocation: each group's own ratio, and its bits where it stores quantized
codes, under the recipe's total budget, chosen from calibration data alone.

Each layer group is fitted at a few candidates around its uniform budget on the dense
model's statistics: budgets from its method (Method.allocation_budgets: multiples of the
uniform budget, or for gptq / rtn the exact stored bits of each allowed bit width), and
with a quantization stage each of those at the stage's bits and one bit either side. Each
fit is scored by the loss increase it predicts,

    e = sum_i s_i ((W - W_hat) H (W - W_hat)^T)_ii,

with H = X^T X of the layer's calibration inputs and s_i the summed squared gradient of
the LM loss with respect to output i (a Gauss-Newton estimate: an output error weighs what
the loss reacts to it, so layers compare on one scale). Structured groups are scored on
the same scale through the matrices whose outputs their removal changes:

- ffn (whole MLP neurons removed, ffn-neurons): its kept up and gate rows are exact, so
  the MLP's output error is that of down against the refitted down with the removed
  neurons' columns zero, on the intermediate activations whose Gram calibration measures
  there (s: down's outputs); its candidates are kept-neuron counts.
- attn (head dims removed, attn-dims): dropping rotary pair p (dims p and p + D/2) of q
  and k removes its term of every attention logit (RoPE rotates within the pair), exactly
  what zeroing those dims of q alone does, so the q / k error is that of q against q with
  the dropped rows zero (s: q_proj's outputs); the v / o
  error is that of the product o V (V: each query head's rows of v) against the refitted
  one, the attention's output as if every head attended to its own token only
  (softmax mixing ignored; s: o_proj's outputs), both on the hidden states entering q.
  Its candidates are head dims.

Linear and structured groups compete for one budget. The candidates minimising the
summed score within the total budget are chosen by a Lagrangian sweep, the leftover filled
greedily. Embedding groups keep the uniform ratio. A method whose fits are slow (the AE)
is scored through its cheaper starting point (Method.allocation_proxy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.calibration import CalibrationConfig, TargetStatistics, cached_statistics
from aecompress.errors import AecompressError
from aecompress.methods import FitContext, GroupSpec
from aecompress.methods.attention import attention_shape, split_attention
from aecompress.methods.structured import split_ffn
from aecompress.pipeline.plan import PlannedGroup, finite_matrices
from aecompress.progress import progress_bar
from aecompress.targets import ATTN_PARTS, Target, structured_path

logger = logging.getLogger(__name__)

STAGE_BIT_STEPS = (-1, 0, 1)  # a stage's bits are also tried one bit lower and higher
NOTHING_TO_TRADE = 0.95  # the smallest candidates' share of the budget that leaves none


@dataclass(frozen=True)
class Option:
    """One candidate of a group: its spec (the quantization stage it stores with), its
    budget of stored bits and its predicted loss increase."""

    spec: GroupSpec
    budget: float
    score: float


ALLOCATED_KINDS = ("linear", "ffn", "attn")  # embedding groups keep the uniform ratio


@dataclass(frozen=True)
class Sensitivity:
    """What a member's score weighs: the Gram H of its inputs and the output gradient
    squares s of each of its error terms (weighed_errors), in their order."""

    xtx: torch.Tensor
    fishers: tuple[torch.Tensor, ...]


def output_projection(target: Target) -> Target:
    """An attn target's o_proj as a linear target: the outputs its v / o error changes."""
    return Target(f"{structured_path(target)}.{ATTN_PARTS[-1]}", "o", target.layer, "linear")


def value_output(o: torch.Tensor, v: torch.Tensor, heads: int, kv: int) -> torch.Tensor:
    """o V [hidden, hidden]: each query head's o columns times its KV head's v rows."""
    size = v.shape[0] // kv
    per_head = v.view(kv, size, -1).repeat_interleave(heads // kv, dim=0)
    return o @ per_head.reshape(heads * size, -1)


def weighed_errors(
    spec: GroupSpec, weight: torch.Tensor, estimate: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The error matrices W - W_hat the score weighs (module docstring): the layer's own,
    an ffn member's down projection, an attn member's q and its v / o product."""
    if spec.kind == "ffn":
        return (split_ffn(weight)[2] - split_ffn(estimate)[2],)
    if spec.kind == "attn":
        size, heads, kv = attention_shape(spec)
        q, _, v, o = split_attention(weight, heads, kv, size)
        q_hat, _, v_hat, o_hat = split_attention(estimate, heads, kv, size)
        values = value_output(o, v, heads, kv) - value_output(o_hat, v_hat, heads, kv)
        return q - q_hat, values
    return (weight - estimate,)


def predicted_increase(
    spec: GroupSpec,
    matrices: list[torch.Tensor],
    estimates: list[torch.Tensor],
    sensitivities: list[Sensitivity],
) -> float:
    """sum over members, error terms and outputs of s_i ((W - W_hat) H (W - W_hat)^T)_ii."""
    total = 0.0
    for weight, estimate, member in zip(matrices, estimates, sensitivities, strict=True):
        errors = weighed_errors(spec, weight.double(), estimate.double())
        for error, fisher in zip(errors, member.fishers, strict=True):
            per_output = ((error @ member.xtx.double()) * error).sum(1)
            total += float((fisher.double() * per_output).sum())
    return total


def sensitivities(
    members: tuple[Target, ...], stats: dict[str, TargetStatistics]
) -> list[Sensitivity]:
    """Each member's Sensitivity from the calibration statistics (an attn member's second
    term weighs by its o_proj's outputs)."""
    found = []
    for target in members:
        weighed_by = [target] + ([output_projection(target)] if target.kind == "attn" else [])
        fishers = []
        for output in weighed_by:
            fisher = stats[output.name].out_fisher
            assert fisher is not None
            fishers.append(fisher)
        xtx = stats[target.name].xtx
        assert xtx is not None
        found.append(Sensitivity(xtx, tuple(fishers)))
    return found


def candidate_specs(spec: GroupSpec) -> list[GroupSpec]:
    """The group's spec and, with a quantization stage, the same with the stage's bits
    one step lower and higher (within 2..8)."""
    stage = spec.quantize
    if stage is None:
        return [spec]
    bits = sorted({min(8, max(2, stage.bits + step)) for step in STAGE_BIT_STEPS})
    return [replace(spec, quantize=stage.model_copy(update={"bits": b})) for b in bits]


def candidate_options(
    plan: PlannedGroup,
    matrices: list[torch.Tensor],
    stats: list[TargetStatistics],
    weights: list[Sensitivity],
    seed: int,
) -> list[Option]:
    """The group's candidates that fit (ratio > 1), each fitted and scored."""
    method = plan.method.allocation_proxy()
    options = []
    for spec in candidate_specs(plan.spec):
        for budget in plan.method.allocation_budgets(spec, plan.budget):
            if budget >= spec.dense_bits:
                continue
            context = FitContext(spec, budget, seed, stats, progress=False)
            try:
                width = method.solve_width(matrices, context)
            except AecompressError:  # too small for this method
                continue
            stored = method.fit(matrices, width, context)
            with torch.no_grad():
                estimates = [method.reconstruct(stored, i) for i in range(spec.count)]
            score = predicted_increase(spec, matrices, estimates, weights)
            options.append(Option(spec, budget, score))
    if not options:
        raise AecompressError(f"{plan.spec.name}: no candidate size fits for allocation")
    return options


def choose(options: list[list[Option]], total: float) -> list[Option]:
    """One option per group minimising the summed score with summed budgets <= total:
    the cheapest Lagrangian choice that fits, then the best upgrades the rest affords."""

    def pick(weight: float) -> list[Option]:
        return [min(group, key=lambda o: o.score + weight * o.budget) for group in options]

    low, high = 0.0, 1.0
    while sum(o.budget for o in pick(high)) > total:
        high *= 4
        if high > 1e30:
            raise AecompressError("allocation: even the smallest sizes exceed the budget")
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (
            (low, middle) if sum(o.budget for o in pick(middle)) <= total else (middle, high)
        )
    chosen = pick(high)
    while True:
        spare = total - sum(o.budget for o in chosen)
        upgrades = [
            ((chosen[g].score - o.score) / (o.budget - chosen[g].budget), g, o)
            for g, group in enumerate(options)
            for o in group
            if chosen[g].budget < o.budget <= chosen[g].budget + spare and o.score < chosen[g].score
        ]
        if not upgrades:
            return chosen
        _, index, option = max(upgrades, key=lambda u: u[0])
        chosen[index] = option


def allocate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    planned: list[PlannedGroup],
    *,
    calibration: CalibrationConfig,
    base_sha256: str,
    seed: int,
    progress: bool = True,
) -> list[PlannedGroup]:
    """The planned groups with budgets (and a stage's bits) re-allocated by predicted loss
    (module docstring)."""
    layers = [p for p in planned if p.spec.kind in ALLOCATED_KINDS]
    if not layers:
        return planned
    targets = [t for p in layers for t in p.group.members]
    targets += [output_projection(t) for t in targets if t.kind == "attn"]
    stats = cached_statistics(
        model,
        tokenizer,
        targets,
        {"xtx", "out_fisher"},
        calibration,
        base_sha256,
        progress=progress,
    )
    options = []
    for plan in progress_bar(layers, desc="allocate", enabled=progress):
        members = plan.group.members
        options.append(
            candidate_options(
                plan,
                finite_matrices(model, members),
                [stats[t.name] for t in members],
                sensitivities(members, stats),
                seed,
            )
        )
    total = sum(p.budget for p in layers)
    smallest = sum(min(o.budget for o in group) for group in options)
    if NOTHING_TO_TRADE * total < smallest <= total:
        logger.warning(
            "--allocate: the smallest candidate of every group takes %.0f%% of the budget "
            "(with a quantization stage: its fewest bits), so almost nothing can be traded "
            "between groups and the result is close to the uniform one; allocation pays "
            "at larger budgets (3 bits a weight and up)",
            100 * smallest / total,
        )
    chosen = choose(options, total)
    allocated = {
        id(p): replace(p, spec=o.spec, budget=o.budget) for p, o in zip(layers, chosen, strict=True)
    }
    return [allocated.get(id(p), p) for p in planned]
