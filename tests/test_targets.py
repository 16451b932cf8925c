import pytest
import torch

from aecompress.errors import AecompressError
from aecompress.targets import group_targets, parse_grouping, resolve_targets, weight_matrix
from tests.conftest import FAMILIES, tiny_model


def test_every_family_resolves_once_per_layer(arch):
    model = tiny_model(arch)
    for family in FAMILIES[arch]:
        targets = resolve_targets(model, [family])
        expected = 1 if family == "embed" else 2
        assert len(targets) == expected, family
        assert all(t.family == family for t in targets)


def test_shapes_are_out_by_in():
    llama = tiny_model("llama")  # GQA: 2 KV heads of 8 -> k and v are 16 x 32, q is 32 x 32
    shape = {
        f: tuple(weight_matrix(llama, resolve_targets(llama, [f])[0]).shape)
        for f in FAMILIES["llama"]
    }
    assert shape == {
        "embed": (30522, 32),
        "q": (32, 32),
        "k": (16, 32),
        "v": (16, 32),
        "o": (32, 32),
        "up": (64, 32),
        "gate": (64, 32),
        "down": (32, 64),
    }


def test_gpt2_conv1d_is_transposed_and_fused_qkv_is_sliced():
    gpt2 = tiny_model("gpt2")
    c_attn = gpt2.transformer.h[0].attn.c_attn.weight  # Conv1D [in, out] = [32, 96]
    q, k, v = (weight_matrix(gpt2, resolve_targets(gpt2, [f])[0]) for f in ("q", "k", "v"))
    assert torch.equal(torch.cat([q, k, v]), c_attn.T)
    up = weight_matrix(gpt2, resolve_targets(gpt2, ["up"])[0])
    assert up.shape == (128, 32)


def test_regex_override_and_errors():
    bert = tiny_model("bert")
    found = resolve_targets(bert, [r"re:.*attention\.self\.(query|key)"])
    assert [t.layer for t in found] == [0, 0, 1, 1]
    with pytest.raises(AecompressError, match="unknown target family 'kq'"):
        resolve_targets(bert, ["kq"])
    with pytest.raises(AecompressError, match="has no 'gate'"):
        resolve_targets(bert, ["gate"])


def test_grouping():
    llama = tiny_model("llama")
    targets = resolve_targets(llama, ["k", "down"])
    assert [g.name for g in group_targets(llama, targets, "none")] == [
        "k.0",
        "k.1",
        "down.0",
        "down.1",
    ]
    assert [g.name for g in group_targets(llama, targets, "layers")] == ["k", "down"]
    assert [len(g.members) for g in group_targets(llama, targets, "layers:1")] == [1, 1, 1, 1]
    with pytest.raises(AecompressError, match="unknown grouping"):
        parse_grouping("layer")


def test_stacking_needs_equal_shapes():
    llama = tiny_model("llama")
    llama.model.layers[1].self_attn.k_proj = torch.nn.Linear(32, 8, bias=False)
    for family in ["k", r"re:.*\.k_proj"]:
        targets = resolve_targets(llama, [family])
        with pytest.raises(AecompressError, match="shapes differ"):
            group_targets(llama, targets, "layers")


@pytest.mark.parametrize("grouping", ["none", "layers", "layers:1"])
def test_a_regex_spanning_families_stacks_each_module_apart(grouping):
    llama = tiny_model("llama")
    targets = resolve_targets(llama, ["re:.*_proj"])
    groups = group_targets(llama, targets, grouping)
    names = [g.name for g in groups]
    assert len(set(names)) == len(names) and sum(len(g.members) for g in groups) == 14
    for group in groups:  # each group: one module of the blocks, in one or more layers
        assert len({t.path.split(".")[-1] for t in group.members}) == 1
    if grouping == "layers":
        assert "model.layers.0-1.mlp.up_proj" in names and len(groups) == 7
    else:
        assert "model.layers.1.self_attn.v_proj" in names and len(groups) == 14


@pytest.mark.parametrize(
    "arch,targets,message",
    [
        ("llama", ["k", r"re:.*\.k_proj"], "'k' and 're:.*\\.k_proj' both select model.layers.0"),
        ("llama", ["embed", "re:lm_head"], "both select lm_head .it shares model.embed_tokens"),
        ("gpt2", ["v", r"re:.*c_attn"], "both select transformer.h.0.attn.c_attn"),
        ("bert", ["k", "k"], "'k' and 'k' both select"),
    ],
)
def test_a_matrix_selected_twice_is_refused(arch, targets, message):
    with pytest.raises(AecompressError, match=message):
        resolve_targets(tiny_model(arch), targets)
