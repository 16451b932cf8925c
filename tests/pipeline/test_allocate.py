"""Budget allocation: the choice under a total budget, the predicted loss, end to end."""

from __future__ import annotations

import itertools

import pytest
import torch

import aecompress
from aecompress.calibration import TargetStatistics
from aecompress.models import LoadedModel
from aecompress.pipeline.allocate import Option, choose, predicted_increase
from tests.conftest import make_tiny


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
        options.append([Option(float(b), float(s)) for b, s in zip(budgets, scores, strict=True)])
    total = sum(group[2].budget for group in options)
    chosen = choose(options, total)
    assert sum(o.budget for o in chosen) <= total
    best = brute_force(options, total)
    assert sum(o.score for o in chosen) <= best + 0.25 * abs(best) + 1e-9


def test_predicted_increase_weighs_output_errors_by_the_loss_sensitivity():
    weight, estimate = torch.ones(2, 3), torch.zeros(2, 3)
    xtx = torch.eye(3, dtype=torch.float64) * 2
    stats = [TargetStatistics(1, xtx=xtx, out_fisher=torch.tensor([1.0, 10.0]).double())]
    # per output: error row [1,1,1] @ 2I @ row^T = 6; weighted 1*6 + 10*6
    assert predicted_increase([weight], [estimate], stats) == pytest.approx(66.0)


def test_sensitivity_allocation_keeps_the_total_and_varies_the_ratios(tokenizer):
    loaded = LoadedModel(
        make_tiny("llama", vocab=tokenizer.vocab_size), tokenizer, "tiny", "AutoModelForCausalLM"
    )
    cm = aecompress.compress(
        loaded,
        method="svdllm",
        ratio=2,
        targets=["q", "up", "down"],
        allocate="sensitivity",
        pipeline="independent",
        calibration={"samples": 4, "seq_len": 32, "batch_size": 4},
        progress=False,
    )
    totals = cm.totals()
    assert totals["stored_bits"] <= totals["target_bits"] / 2
    assert len({round(g.ratio, 3) for g in cm.groups}) > 1
