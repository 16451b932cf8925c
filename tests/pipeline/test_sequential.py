"""The sequential pipeline: compensation maths, stages, positions, streams, end to end."""

from __future__ import annotations

import pytest
import torch

import aecompress
from aecompress.calibration import CalibrationConfig, InputMoments, calibration_windows
from aecompress.models import LoadedModel
from aecompress.pipeline import sequential
from aecompress.pipeline.plan import plan_groups
from aecompress.pipeline.sequential import compensated, forward_positions, passes, plan_stages
from aecompress.pipeline.streams import capture_block_inputs
from aecompress.recipe import Recipe
from aecompress.targets import transformer_blocks
from tests.conftest import make_tiny

CALIBRATION = {"samples": 8, "seq_len": 32, "batch_size": 4}


def moments_of(compressed: torch.Tensor, dense: torch.Tensor) -> InputMoments:
    moments = InputMoments()
    for xc, xd in zip(compressed.split(50), dense.split(50), strict=True):
        moments.add(xc, xd)
    return moments


def test_the_compensated_target_is_the_ridge_least_squares_optimum():
    """W' minimises ||X_c W'^T - X_d W^T||^2 + lambda ||W' - W||^2 (normal equations)."""
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    compressed = dense + 0.3 * torch.randn(200, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 6, generator=generator)
    moments = moments_of(compressed, dense)
    target = compensated(moments, weight, damp=0.05).double()
    ridge = 0.05 * (compressed.T @ compressed).diagonal().mean()
    gradient = (compressed @ target.T - dense @ weight.double().T).T @ compressed
    gradient += ridge * (target - weight.double())
    assert gradient.abs().max() < 1e-4 * weight.abs().max() * ridge
    # the methods whiten with H itself
    expected = compressed.T @ compressed
    torch.testing.assert_close(moments.statistics().xtx, expected, rtol=1e-5, atol=1e-5)


def test_without_upstream_error_the_target_is_the_weight_itself():
    inputs = torch.randn(120, 5, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(3, 5)
    target = compensated(moments_of(inputs, inputs), weight, damp=0.01)
    torch.testing.assert_close(target, weight, atol=1e-5, rtol=1e-5)


def test_stages_merge_the_blocks_a_stacked_group_spans(tokenizer):
    model = make_tiny("llama", vocab=tokenizer.vocab_size)
    recipe = Recipe(
        method="shared-basis", ratio=2, targets=["embed", "k", "down"], group="layers:2"
    )
    path, blocks = transformer_blocks(model)
    outside, stages = plan_stages(plan_groups(model, recipe), path, len(blocks))
    assert [p.group.family for p in outside] == ["embed"]
    assert [(s.first, s.last) for s in stages] == [(0, 1)]
    single = Recipe(method="svdllm", ratio=2, targets=["down"])
    _, stages = plan_stages(plan_groups(model, single), path, len(blocks))
    assert [(s.first, s.last, len(s.groups)) for s in stages] == [(0, 0, 1), (1, 1, 1)]


@pytest.mark.parametrize(
    ("arch", "order"),
    [
        ("llama", [{"q", "k", "v"}, {"o"}, {"up", "gate"}, {"down"}]),
        ("gpt2", [{"q", "k", "v"}, {"o"}, {"up"}, {"down"}]),
        ("bert", [{"q", "k", "v"}, {"o"}, {"up"}, {"down"}]),
    ],
)
def test_positions_follow_the_forward_order_and_shared_inputs(tokenizer, arch, order):
    model = make_tiny(arch, vocab=tokenizer.vocab_size)
    families = ["q", "k", "v", "o", "up", "down"] + (["gate"] if arch == "llama" else [])
    recipe = Recipe(method="svd", ratio=2, targets=families)
    path, blocks = transformer_blocks(model)
    _, stages = plan_stages(plan_groups(model, recipe), path, len(blocks))
    ids = torch.randint(
        0, tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    hidden, inputs = capture_block_inputs(model, blocks[0], ids, 2)
    stage = stages[0]
    positions = forward_positions(blocks[:1], stage, path, hidden[0], inputs[0])
    assert [{p.group.family for p in groups} for groups in positions] == order
    assert passes(positions, "layer") == positions
    # block: fitted last to first; down's X^T X outweighs the others' together: two passes
    block = passes(positions, "block")
    assert [g for groups in block for g in groups] == [g for p in positions[::-1] for g in p]
    assert [{p.group.family for p in groups} for groups in block] == [
        {"down"},
        set().union(*order[:-1]),
    ]


@pytest.mark.parametrize(
    "arch,target", [("llama", "local"), ("llama", "dense"), ("gpt2", "local"), ("bert", "dense")]
)
def test_sequential_compression_round_trips_and_reads_shared_inputs_once(
    tokenizer, arch, target, tmp_path, monkeypatch
):
    calls = []
    original = InputMoments.add

    def counting(self, compressed, dense):
        calls.append(compressed.shape[-1])
        original(self, compressed, dense)

    monkeypatch.setattr(InputMoments, "add", counting)
    model = make_tiny(arch, vocab=tokenizer.vocab_size)
    loaded = LoadedModel(model, tokenizer, "tiny", "AutoModelForCausalLM")
    targets = ["q", "k", "v", "o", "up", "down"]
    cm = aecompress.compress(
        loaded,
        method="svdllm",
        ratio=2,
        targets=targets,
        pipeline="sequential",
        sequential={"target": target},
        calibration=CALIBRATION,
        progress=False,
    )
    # per block and batch: one input for q,k,v, one for o, one for up, one for down
    assert len(calls) == 4 * 2 * 2
    ids = torch.randint(
        0, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        expected = cm.model(input_ids=ids).logits
    cm.save_pretrained(tmp_path / "art")
    again = aecompress.load(tmp_path / "art")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected)


@pytest.mark.parametrize(
    "fields,kept",
    [
        ({"sequential": {"target": "local"}}, False),
        ({"sequential": {"target": "dense"}}, True),
        ({"refine": {"steps": 1}}, True),
    ],
)
def test_the_dense_stream_is_kept_only_when_something_reads_it(
    tokenizer, monkeypatch, fields, kept
):
    """The local target without refinement needs neither the dense hidden states nor a
    dense copy of each block: one capture of the block inputs, no copies."""
    captures, copies = [], []
    capture, deepcopy = sequential.capture_block_inputs, sequential.copy.deepcopy
    monkeypatch.setattr(
        sequential, "capture_block_inputs", lambda *a: captures.append(1) or capture(*a)
    )
    monkeypatch.setattr(
        sequential.copy, "deepcopy", lambda x, *a: copies.append(type(x)) or deepcopy(x, *a)
    )
    model = make_tiny("llama", vocab=tokenizer.vocab_size)
    loaded = LoadedModel(model, tokenizer, "tiny", "AutoModelForCausalLM")
    aecompress.compress(
        loaded,
        method="sparsegpt",
        ratio=1.5,
        targets=["up", "down"],
        pipeline="sequential",
        calibration=CALIBRATION,
        progress=False,
        **fields,
    )
    assert len(captures) == (2 if kept else 1)
    blocks = transformer_blocks(model)[1]
    assert (type(blocks[0]) in copies) == kept


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_block_granularity_calibrates_every_layer_on_the_block_as_it_was(
    tokenizer, monkeypatch, granularity
):
    """`block`: every layer is fitted under the inputs of the block as it was (none of its
    layers replaced yet); `layer`: each under the outputs of the compressed ones before
    it (only q, the first, sees the block as it was)."""
    grams: dict[str, torch.Tensor] = {}
    fit_group = sequential.fit_group

    def recording(plan, matrices, statistics, **kwargs):
        grams[plan.group.members[0].path] = statistics[0].xtx.clone()
        return fit_group(plan, matrices, statistics, **kwargs)

    monkeypatch.setattr(sequential, "fit_group", recording)
    model = make_tiny("llama", vocab=tokenizer.vocab_size)
    paths = [
        f"model.layers.0.{p}"
        for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in paths}
    hooks = [
        model.get_submodule(path).register_forward_pre_hook(
            lambda _module, args, path=path: seen[path].append(
                args[0].reshape(-1, args[0].shape[-1]).double()
            )
        )
        for path in paths
    ]
    windows = calibration_windows(tokenizer, CalibrationConfig(**CALIBRATION))
    with torch.no_grad():
        model(input_ids=windows)
    for hook in hooks:
        hook.remove()
    loaded = LoadedModel(model, tokenizer, "tiny", "AutoModelForCausalLM")
    aecompress.compress(
        loaded,
        method="sparsegpt",
        ratio=2,
        targets=["q", "o", "up", "down"],
        pipeline="sequential",
        sequential={"granularity": granularity},
        calibration=CALIBRATION,
        progress=False,
    )
    as_it_was = {  # relative differences are 1e-7 (rounding) or 1e-3 and more
        path: (grams[path] - torch.cat(x).T @ torch.cat(x)).norm() < 1e-5 * grams[path].norm()
        for path, x in seen.items()
    }
    expected = [True] * 4 if granularity == "block" else [True, False, False, False]
    assert list(as_it_was.values()) == expected
