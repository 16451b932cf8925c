"""Budget allocation: the choice under a total budget, the predicted loss, end to end."""

from __future__ import annotations

import itertools

import pytest
import torch

import aecompress
from aecompress.errors import AecompressError
from aecompress.methods import GroupSpec
from aecompress.methods.stage import QuantStage
from aecompress.models import LoadedModel
from aecompress.pipeline.allocate import (
    Option,
    Sensitivity,
    candidate_specs,
    choose,
    predicted_increase,
)
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
    weights = [Sensitivity(xtx, (torch.tensor([1.0, 10.0]).double(),))]
    # per output: error row [1,1,1] @ 2I @ row^T = 6; weighted 1*6 + 10*6
    spec = GroupSpec("up", "up", "linear", 1, 2, 3)
    assert predicted_increase(spec, [weight], [estimate], weights) == pytest.approx(66.0)


def test_an_ffn_group_is_scored_by_its_mlp_output_error():
    """Removing neurons and refitting down: the score is the MLP's output error on the
    intermediate activations A, sum_i s_i ||A (down - down_hat)^T e_i||^2."""
    generator = torch.Generator().manual_seed(0)
    intermediate, hidden = 6, 3
    activations = torch.randn(40, intermediate, generator=generator, dtype=torch.float64)
    up, gate = torch.randn(2, intermediate, hidden, generator=generator)
    down, down_hat = torch.randn(2, hidden, intermediate, generator=generator)
    removed = torch.tensor([1, 4])
    up_hat, gate_hat = up.clone(), gate.clone()
    up_hat[removed], gate_hat[removed], down_hat[:, removed] = 0, 0, 0
    weight, estimate = torch.cat([up, gate, down.T]), torch.cat([up_hat, gate_hat, down_hat.T])
    sensitivity = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    weights = [Sensitivity(activations.T @ activations, (sensitivity,))]
    output_error = activations @ (down - down_hat).double().T  # [tokens, hidden]
    expected = float((output_error.square().sum(0) * sensitivity).sum())
    spec = GroupSpec("ffn", "ffn", "ffn", 1, 3 * intermediate, hidden)
    assert predicted_increase(spec, [weight], [estimate], weights) == pytest.approx(expected)


def test_an_attn_group_is_scored_by_its_dropped_logit_terms_and_value_output_error():
    """attn-dims' estimate: q and k without a rotary pair, v / o refitted. The score is
    the q_proj-weighted error of the dropped q dims (what dropping them from q and k
    removes from the logits) plus the o_proj-weighted error of each head's output o_h v_g
    x, every head attending to its own token."""
    generator = torch.Generator().manual_seed(0)
    hidden, size, heads, kv = 8, 4, 4, 2
    inputs = torch.randn(30, hidden, generator=generator, dtype=torch.float64)
    q = torch.randn(heads * size, hidden, generator=generator, dtype=torch.float64)
    k, v = torch.randn(2, kv * size, hidden, generator=generator, dtype=torch.float64)
    o = torch.randn(hidden, heads * size, generator=generator, dtype=torch.float64)
    dropped = torch.tensor([1, 3])  # pair 1 of a head of 4 dims: dims 1 and 3
    q_hat, k_hat = q.view(heads, size, -1).clone(), k.view(kv, size, -1).clone()
    q_hat[:, dropped], k_hat[:, dropped] = 0, 0
    v_hat, o_hat = v * 0.9, o * 1.1
    weight = torch.cat([q, k, v, o.T])
    estimate = torch.cat([q_hat.reshape_as(q), k_hat.reshape_as(k), v_hat, o_hat.T])
    q_fisher = torch.rand(heads * size, generator=generator, dtype=torch.float64)
    o_fisher = torch.rand(hidden, generator=generator, dtype=torch.float64)
    logits_lost = (inputs @ (q - q_hat.reshape_as(q)).T).square().sum(0)
    outputs = [
        sum(
            inputs @ v_[g * size : (g + 1) * size].T @ o_[:, h * size : (h + 1) * size].T
            for h in range(heads)
            for g in [h // (heads // kv)]
        )
        for v_, o_ in ((v, o), (v_hat, o_hat))
    ]
    expected = float((q_fisher * logits_lost).sum()) + float(
        (o_fisher * (outputs[0] - outputs[1]).square().sum(0)).sum()
    )
    spec = GroupSpec("attn", "attn", "attn", 1, 2 * (heads + kv) * size, hidden, size, kv_heads=kv)
    weights = [Sensitivity(inputs.T @ inputs, (q_fisher, o_fisher))]
    assert predicted_increase(spec, [weight], [estimate], weights) == pytest.approx(expected)


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


@pytest.mark.parametrize(
    ("method", "target", "block", "output", "width_of"),
    [
        ("ffn-neurons", "ffn", "mlp", "down_proj", lambda mlp: mlp.up_proj.weight.shape[0]),
        ("attn-dims", "attn", "self_attn", "o_proj", lambda attention: attention.head_dim),
    ],
    ids=["mlps", "attentions"],
)
def test_sensitivity_allocation_gives_blocks_their_own_widths(
    tokenizer, tmp_path, method, target, block, output, width_of
):
    """Structured groups under --allocate: the block whose output weighs more (layer 0's
    output projection scaled up) keeps more neurons / head dims, within the total budget;
    the artifact loads back with blocks of these sizes, and a plain export is refused."""
    loaded = tiny_llama(tokenizer)
    with torch.no_grad():
        getattr(getattr(loaded.model.model.layers[0], block), output).weight.mul_(4)
    cm = aecompress.compress(
        loaded,
        method=method,
        ratio=1.5,
        targets=[target],
        allocate="sensitivity",
        calibration=CALIBRATION,
        progress=False,
    )
    totals = cm.totals()
    assert totals["stored_bits"] <= totals["target_bits"] / 1.5
    widths = [g.stored.width for g in cm.groups]
    assert widths[0] > widths[1]
    cm.save_pretrained(tmp_path / "art")
    loaded = aecompress.load(tmp_path / "art")
    for fitted, width in zip(cm.groups, widths, strict=True):
        layer = fitted.group.members[0].layer
        assert width_of(getattr(loaded.model.layers[layer], block)) == width
    ids = torch.randint(
        0, tokenizer.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, cm.model(ids).logits)
    with pytest.raises(AecompressError, match="without --allocate"):
        aecompress.export_dense(tmp_path / "art", tmp_path / "plain")


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
