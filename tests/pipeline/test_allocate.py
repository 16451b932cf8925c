"""Budget allocation: the choice under a total budget, the predicted loss, end to end."""

from __future__ import annotations

import itertools

import pytest
import torch

import aecompress
from aecompress.calibration import TargetStatistics
from aecompress.methods import GroupSpec
from aecompress.methods.stage import QuantStage
from aecompress.models import LoadedModel
from aecompress.pipeline.allocate import Option, candidate_specs, choose, predicted_increase
from aecompress.summary import describe_artifact
from tests.conftest import make_tiny

SPEC = GroupSpec("up", "up", "linear", 1, 4, 4)
CALIBRATION = {"samples": 4, "seq_len": 32, "batch_size": 4}
# bf16 storage: 2-bit codes and a bf16 scale per 16 weights take 3 bits a weight (3 bits: 4)
RATIO_AT_2_BITS = 5.3


def brute_force(options: list[list[Option]], total: float) -> float:
    return min(
        sum(o.score for o in combo)
        for combo in itertools.product(*options)
        if sum(o.budget for o in combo) <= total
    )


@pytest.mark.parametrize("seed", range(5))
def test_choice_fits_the_budget_and_is_near_the_brute_force_optimum(seed):
    generator = torch.Generator().manual_seed(seed)
    options = []
    for _ in range(4):
        budgets = torch.rand(4, generator=generator).sort().values * 10
        scores = torch.rand(4, generator=generator).sort(descending=True).values * 5
        options.append(
            [Option(SPEC, float(b), float(s)) for b, s in zip(budgets, scores, strict=True)]
        )
    total = sum(group[2].budget for group in options)
    chosen = choose(options, total)
    assert sum(o.budget for o in chosen) <= total
    best = brute_force(options, total)
    assert sum(o.score for o in chosen) <= best + 0.25 * abs(best) + 1e-9


@pytest.mark.parametrize(("bits", "tried"), [(4, [3, 4, 5]), (2, [2, 3]), (8, [7, 8])])
def test_a_stage_is_tried_at_its_bits_and_one_bit_either_side(bits, tried):
    stage = QuantStage(bits=bits, group=16, damp=0.1)
    specs = candidate_specs(GroupSpec("up", "up", "linear", 1, 4, 32, quantize=stage))
    assert [s.quantize.bits for s in specs] == tried
    assert {s.quantize.model_copy(update={"bits": bits}) for s in specs} == {stage}
    assert candidate_specs(SPEC) == [SPEC]


def test_predicted_increase_weighs_output_errors_by_the_loss_sensitivity():
    weight, estimate = torch.ones(2, 3), torch.zeros(2, 3)
    xtx = torch.eye(3, dtype=torch.float64) * 2
    stats = [TargetStatistics(1, xtx=xtx, out_fisher=torch.tensor([1.0, 10.0]).double())]
    # per output: error row [1,1,1] @ 2I @ row^T = 6; weighted 1*6 + 10*6
    assert predicted_increase([weight], [estimate], stats) == pytest.approx(66.0)


def tiny_llama(tokenizer) -> LoadedModel:
    model = make_tiny("llama", vocab=tokenizer.vocab_size)
    return LoadedModel(model, tokenizer, "tiny", "AutoModelForCausalLM")


def test_sensitivity_allocation_keeps_the_total_and_varies_the_ratios(tokenizer):
    cm = aecompress.compress(
        tiny_llama(tokenizer),
        method="svdllm",
        ratio=2,
        targets=["q", "up", "down"],
        allocate="sensitivity",
        pipeline="independent",
        calibration=CALIBRATION,
        progress=False,
    )
    totals = cm.totals()
    assert totals["stored_bits"] <= totals["target_bits"] / 2
    assert len({round(g.ratio, 3) for g in cm.groups}) > 1


def code_bits(layout) -> int:
    """Bits per code of a group: gptq / rtn's own, or its quantization stage's."""
    return layout.bits if layout.quantize is None else layout.quantize.stage.bits


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "gptq", "options": {"group": 16}},
        {"method": "rtn", "options": {"group": 16}},
        {"method": "sparsegpt", "quantize": "int3:g16"},
    ],
    ids=["gptq", "rtn", "sparsegpt-stage"],
)
def test_bit_allocation_keeps_the_total_varies_the_bits_and_round_trips(
    tokenizer, tmp_path, fields
):
    """Quantized groups get their own bits under the total budget, counted in stored bits;
    the artifact records them, loads them back, and inspect shows them."""
    ratio = 5.0
    cm = aecompress.compress(
        tiny_llama(tokenizer),
        ratio=ratio,
        targets=["q", "o", "up", "gate", "down"],
        allocate="sensitivity",
        pipeline="independent",
        calibration=CALIBRATION,
        progress=False,
        **fields,
    )
    totals = cm.totals()
    assert totals["stored_bits"] <= totals["target_bits"] / ratio
    bits = {g.group.name: code_bits(g.stored.layout) for g in cm.groups}
    assert len(set(bits.values())) > 1
    ids = torch.randint(
        0, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = cm.model(ids).logits
    cm.save_pretrained(tmp_path / "art")
    loaded = aecompress.load(tmp_path / "art")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-4, rtol=1e-3)
    lines = describe_artifact(tmp_path / "art", per_matrix=True).splitlines()
    header = next(line for line in lines if line.startswith("| group "))
    column = [c.strip() for c in header.split("|")].index("code bits")
    for name, group_bits in bits.items():
        row = next(line for line in lines if line.startswith(f"| {name} "))
        assert row.split("|")[column].strip() == str(group_bits)


def test_allocating_at_the_fewest_bits_warns_that_nothing_can_be_traded(tokenizer, caplog):
    """At 2 bits (the fewest) every group's smallest candidate is its whole share."""
    cm = aecompress.compress(
        tiny_llama(tokenizer),
        method="rtn",
        options={"group": 16},
        ratio=RATIO_AT_2_BITS,
        targets=["up", "down"],
        allocate="sensitivity",
        calibration=CALIBRATION,
        progress=False,
    )
    assert {code_bits(g.stored.layout) for g in cm.groups} == {2}
    assert "nothing can be traded" in caplog.text
