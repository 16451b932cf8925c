"""The AE through the engine, artifact and report on tiny models of every architecture."""

from __future__ import annotations

import pytest
import torch

import aecompress
from aecompress.artifact import load_compressed, read_manifest
from aecompress.errors import AecompressError
from aecompress.modules import DecodedEmbedding, DecodedLinear
from aecompress.summary import describe_artifact
from tests.conftest import make_tiny, tiny_tokenizer

QUICK = {"epochs": 2, "batch_size": 32, "row_weights": "none", "decoder": [2, 4]}
FAMILIES = {
    "bert": ["embed", "q", "k", "v", "o", "up", "down"],
    "gpt2": ["embed", "q", "k", "v", "o", "up", "down"],
    "llama": ["embed", "q", "k", "v", "o", "up", "gate", "down"],
}


@pytest.mark.parametrize("grouping", ["none", "layers"])
@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_family_compresses_within_budget(arch, grouping, small_ids):
    cm = aecompress.compress(
        make_tiny(arch),
        method="ae",
        options={**QUICK, "epochs": 1},
        ratio=2,
        targets=FAMILIES[arch],
        group=grouping,
        progress=False,
    )
    assert all(g.stored_numel <= g.original_numel / 2 for g in cm.groups)
    members = {len(g.group.members) for g in cm.groups}
    assert members == ({1} if grouping == "none" else {1, 2})  # embed alone, layers stacked
    assert torch.isfinite(cm.model(input_ids=small_ids).logits).all()


@pytest.mark.parametrize("runtime", ["dense", "decoder"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_round_trip_gives_identical_logits(arch, runtime, tmp_path, small_ids):
    cm = aecompress.compress(
        make_tiny(arch),
        method="ae",
        options={**QUICK, "runtime": runtime},
        ratio=2,
        targets=["embed", "k", "down"],
        group="layers",
        progress=False,
        tokenizer=tiny_tokenizer(),
    )
    expected = cm.model(input_ids=small_ids).logits
    cm.save_pretrained(str(tmp_path / "art"))
    loaded = load_compressed(tmp_path / "art")
    torch.testing.assert_close(loaded.model(input_ids=small_ids).logits, expected, rtol=0, atol=0)
    decoded = load_compressed(tmp_path / "art", decode=True)
    torch.testing.assert_close(
        decoded.model(input_ids=small_ids).logits, expected, rtol=1e-5, atol=1e-5
    )
    kinds = {type(m) for m in loaded.model.modules()}
    assert (DecodedLinear in kinds and DecodedEmbedding in kinds) == (runtime == "decoder")


def test_decoder_runtime_shares_one_decoder_per_group_and_fine_tunes_it(small_ids):
    cm = aecompress.compress(
        make_tiny("llama"),
        method="ae",
        options={**QUICK, "runtime": "decoder"},
        ratio=2,
        targets=["k"],
        group="layers",
        progress=False,
    )
    layers = [cm.model.model.layers[i].self_attn.k_proj for i in range(2)]
    assert all(isinstance(m, DecodedLinear) for m in layers)
    assert layers[0].w0 is layers[1].w0 and layers[0].codes is not layers[1].codes
    assert layers[0].w0 is cm.groups[0].stored.shared["w0"]
    assert sum(p is layers[0].w0 for p in cm.model.parameters()) == 1
    last = layers[0].w2  # decoder [x, 2x, 4x, 32]: the output layer always gets a gradient
    before = last.detach().clone()
    torch.optim.SGD(cm.model.parameters(), lr=0.1).zero_grad()
    cm.model(input_ids=small_ids, labels=small_ids).loss.backward()
    assert last.grad is not None and layers[0].codes.grad is not None
    with torch.no_grad():
        last -= 0.1 * last.grad
    assert not torch.equal(layers[1].w2, before)  # the other layer sees the update


def test_inspect_shows_width_decoder_and_ratio(tmp_path):
    cm = aecompress.compress(
        make_tiny("bert"),
        method="ae",
        options=QUICK,
        ratio=2,
        targets=["k"],
        group="layers",
        tokenizer=tiny_tokenizer(),
    )
    cm.save_pretrained(str(tmp_path / "art"))
    manifest = read_manifest(tmp_path / "art")
    group = manifest["groups"][0]
    x, info = group["width"], group["info"]
    assert info["decoder"] == [x, 2 * x, 4 * x, 32] and info["epoch"] in (1, 2)
    text = describe_artifact(tmp_path / "art", per_matrix=True)
    assert f"| {x} |" in text and "decoder=" in text and "selection=reconstruction" in text
    assert f"{group['ratio']:.3f}" in text


def test_a_quantized_embedding_codec_loads_back_and_inspect_names_its_stage(tmp_path):
    """Token embeddings (a non-linear decoder with a skip path) stored as int4 codes."""
    cm = aecompress.compress(
        make_tiny("bert"),
        method="ae",
        options={**QUICK, "qat_epochs": 1},
        ratio=4,
        targets=["embed"],
        quantize="int4:g16",
        tokenizer=tiny_tokenizer(),  # of the tiny model's vocabulary
    )
    cm.save_pretrained(str(tmp_path / "art"))
    loaded = load_compressed(tmp_path / "art")
    ids = torch.arange(40).view(2, 20)
    embed = cm.model.get_input_embeddings()
    torch.testing.assert_close(loaded.model.get_input_embeddings()(ids), embed(ids))
    assert "ae + int4:g16:gptq" in describe_artifact(tmp_path / "art")


@pytest.mark.parametrize("pipeline", ["independent", "sequential"])
def test_selection_by_validation_perplexity(tokenizer, pipeline):
    """Either pipeline hands the AE the validation metric the engine gives it."""
    model = make_tiny("llama", vocab=tokenizer.vocab_size)
    cm = aecompress.compress(
        model,
        method="ae",
        options={**QUICK, "selection": "validation"},
        ratio=2,
        targets=["k"],
        group="layers",
        pipeline=pipeline,
        tokenizer=tokenizer,
        progress=False,
    )
    info = cm.groups[0].stored.info
    assert info["selection"] == "validation" and info["selection_value"] > 1


def test_encoder_selection_by_stsb_dev(tokenizer):
    cm = aecompress.compress(
        make_tiny("bert-encoder", vocab=tokenizer.vocab_size),
        method="ae",
        options={**QUICK, "selection": "validation"},
        ratio=2,
        targets=["k"],
        group="layers",
        tokenizer=tokenizer,
        progress=False,
    )
    info = cm.groups[0].stored.info
    assert info["selection"] == "validation" and -100 <= info["selection_value"] <= 100


def test_default_row_weights_are_token_counts_for_embeddings(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path))
    cm = aecompress.compress(
        make_tiny("bert", vocab=tokenizer.vocab_size),
        method="ae",
        options={"epochs": 1, "decoder": [2, 4]},
        ratio=4,
        targets=["embed", "k"],
        tokenizer=tokenizer,
        calibration={"samples": 4, "seq_len": 32},
        progress=False,
    )
    weights = {g.group.family: g.stored.info["row_weights"] for g in cm.groups}
    assert weights == {"embed": "counts", "k": "none"}


def test_fisher_weights_need_an_lm_head(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path))
    calibration = {"samples": 2, "seq_len": 16}
    with pytest.raises(AecompressError, match="no LM head"):
        aecompress.compress(
            make_tiny("bert-encoder", vocab=tokenizer.vocab_size),
            method="ae",
            options={**QUICK, "row_weights": "fisher"},
            ratio=2,
            targets=["k"],
            tokenizer=tokenizer,
            calibration=calibration,
            progress=False,
        )
    cm = aecompress.compress(
        make_tiny("llama", vocab=tokenizer.vocab_size),
        method="ae",
        options={**QUICK, "row_weights": "fisher"},
        ratio=2,
        targets=["k"],
        group="layers",
        tokenizer=tokenizer,
        calibration=calibration,
        progress=False,
    )
    assert cm.groups[0].stored.info["row_weights"] == "fisher"
