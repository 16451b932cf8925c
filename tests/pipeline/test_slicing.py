import copy
import json

import pytest
import torch
import transformers

import aecompress
from aecompress.artifact import MANIFEST
from aecompress.errors import AecompressError
from aecompress.pipeline.slicing import (
    blocks_linear_params,
    slice_stream,
    sliced_width,
    stream_directions,
)
from aecompress.summary import artifact_facts
from tests.artifact.conftest import IDS, plain_logits
from tests.conftest import compressed_tiny, make_tiny, tiny_model


def llama_with_gains() -> transformers.PreTrainedModel:
    """The tiny Llama with random RMSNorm gains (folding them is part of slicing)."""
    model = make_tiny("llama")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def projected(model: transformers.PreTrainedModel, basis: torch.Tensor) -> torch.Tensor:
    """The dense model with its residual stream projected onto span(basis) wherever it is
    written: the embedding and every o / down projection multiplied by P P^T."""
    model = copy.deepcopy(model)
    projection = basis @ basis.T
    with torch.no_grad():
        embed = model.get_input_embeddings()
        embed.weight = torch.nn.Parameter(embed.weight @ projection)
        for layer in model.model.layers:
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight.copy_(projection @ writer.weight)
    return model


def orthonormal(size: int, width: int) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.linalg.qr(torch.randn(size, size))[0][:, :width]


@pytest.mark.parametrize("width", [32, 20])
def test_sliced_model_computes_the_projected_stream(width: int, small_ids: torch.Tensor) -> None:
    model = llama_with_gains()
    basis = orthonormal(32, width)
    reference = projected(model, basis)(small_ids).logits
    slice_stream(model, basis)
    logits = model(small_ids).logits
    assert model.config.hidden_size == width
    assert model.get_input_embeddings().weight.shape == (96, width)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_sliced_model_is_a_plain_smaller_llama(tmp_path, small_ids: torch.Tensor) -> None:
    model = llama_with_gains()
    before = blocks_linear_params(model)
    slice_stream(model, orthonormal(32, 16))
    assert blocks_linear_params(model) * 2 == before
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.config.hidden_size == 16 and not plain.config.tie_word_embeddings
    torch.testing.assert_close(plain(small_ids).logits, model(small_ids).logits)


def test_stream_directions_are_orthonormal_by_decreasing_energy(small_ids: torch.Tensor) -> None:
    model = llama_with_gains()
    directions = stream_directions(model, small_ids, progress=False)
    torch.testing.assert_close(directions.T @ directions, torch.eye(32, dtype=torch.float64))
    energy = []  # of the first norm's normalised input along each direction
    hidden = model.get_input_embeddings()(small_ids).reshape(-1, 32).double()
    normalised = hidden / hidden.pow(2).mean(-1, keepdim=True).sqrt()
    energy = (normalised @ directions).pow(2).sum(0)
    assert energy[:4].sum() > energy[-4:].sum()


def test_slicing_refuses_a_model_without_llama_blocks() -> None:
    with pytest.raises(AecompressError, match="Llama-style"):
        slice_stream(make_tiny("gpt2"), orthonormal(32, 16))


@pytest.mark.parametrize(("ratio", "width"), [(1.25, 459), (2.0, 288), (64.0, 9)])
def test_sliced_width_is_a_multiple_of_the_heads_within_the_budget(
    ratio: float, width: int
) -> None:
    assert sliced_width(576, ratio, multiple=9) == width


def test_a_ratio_leaving_no_direction_is_refused() -> None:
    with pytest.raises(AecompressError, match="keeps no direction"):
        sliced_width(576, 100.0, multiple=9)


CALIBRATION = {"samples": 8, "seq_len": 32, "batch_size": 4}


def test_slicegpt_artifact_loads_inspects_and_exports_as_a_smaller_llama(tokenizer, tmp_path):
    cm = compressed_tiny(
        tokenizer, "llama", method="slicegpt", ratio=1.5, targets=[], calibration=CALIBRATION
    )
    assert (cm.sliced.hidden_size, cm.sliced.width) == (32, 20)  # 21 rounded to the 4 heads
    assert cm.totals()["ratio"] == cm.totals()["number_ratio"] == 32 / 20
    ids = torch.tensor(IDS)
    expected = cm.model(input_ids=ids).logits
    cm.save_pretrained(tmp_path / "art")
    torch.testing.assert_close(aecompress.load(tmp_path / "art")(input_ids=ids).logits, expected)
    totals = artifact_facts(tmp_path / "art")["totals"]
    assert (totals["target_params"], totals["stored_params"]) == (18432, 11520)
    dense = sum(p.numel() for p in tiny_model("llama").parameters())
    assert totals["model_params_dense"] == dense  # the tied head counted once
    vocab = tiny_model("llama").config.vocab_size
    assert (
        totals["model_params_artifact"] == dense - 18432 + 11520 - vocab * 12 + vocab * 20 - 5 * 12
    )
    aecompress.export_dense(tmp_path / "art", tmp_path / "plain")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "plain")
    assert config.hidden_size == 20 and not config.tie_word_embeddings
    logits = plain_logits(tmp_path / "plain", "LlamaForCausalLM")
    torch.testing.assert_close(logits, expected.flatten(), rtol=1e-4, atol=1e-5)


def test_inspect_counts_the_sliced_matrices_from_the_weights_files(tokenizer, tmp_path):
    cm = compressed_tiny(
        tokenizer, "llama", method="slicegpt", ratio=2, targets=[], calibration=CALIBRATION
    )
    cm.save_pretrained(tmp_path / "art")
    path = tmp_path / "art" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["sliced"]["stored_params"] -= 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(AecompressError, match="weights files hold 9,216 numbers of the sliced"):
        artifact_facts(tmp_path / "art")


def test_only_a_sliced_artifact_has_the_sliced_entry(tokenizer, tmp_path):
    compressed_tiny(tokenizer, "llama", targets=["down"]).save_pretrained(tmp_path / "art")
    assert "sliced" not in json.loads((tmp_path / "art" / MANIFEST).read_text())
