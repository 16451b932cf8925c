"""export_dense: a plain transformers folder that loads without aecompress."""

import json
import shutil

import pytest
import torch
import transformers

import aecompress
from aecompress.artifact import MANIFEST, read_manifest
from aecompress.artifact.export import rotary_window
from aecompress.errors import AecompressError
from aecompress.methods.pruning import pack_bits
from tests.artifact.conftest import IDS, plain_logits
from tests.conftest import FAMILIES, compressed_tiny, tiny_model


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_export_dense_loads_with_plain_transformers(arch, tokenizer, tmp_path):
    targets = FAMILIES[arch]  # embed included: a tied head must follow the decoded embedding
    cm = compressed_tiny(tokenizer, arch, ratio=2.5, targets=targets)
    cm.save_pretrained(tmp_path / "art")
    aecompress.export_dense(tmp_path / "art", tmp_path / "plain")
    files = {p.name for p in (tmp_path / "plain").iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and MANIFEST not in files
    assert "aecompress" not in (tmp_path / "plain" / "config.json").read_text()
    auto = read_manifest(tmp_path / "art")["auto_class"]
    plain = getattr(transformers, auto).from_pretrained(tmp_path / "plain").eval()
    decoded = aecompress.load(tmp_path / "art", decode=True)
    ids = torch.tensor(IDS)
    expected = decoded(input_ids=ids).logits
    # the same weights through other kernels (GPT-2's Conv1D is an addmm of the transposed
    # weight, the decoded model a Linear): equal up to float32 rounding, which differs
    # between CPUs; a wrong or missing weight moves the logits by orders of magnitude more
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    head, embed = plain.get_output_embeddings(), plain.get_input_embeddings()
    assert torch.equal(head.weight, embed.weight)
    assert torch.equal(embed.weight, decoded.get_input_embeddings().weight)
    if arch == "llama":  # and without aecompress importable at all
        torch.testing.assert_close(plain_logits(tmp_path / "plain", auto), expected.flatten())


def test_export_dense_refuses_a_folder_with_content(tokenizer, tmp_path):
    cm = compressed_tiny(tokenizer, "llama", targets=["down"])
    cm.save_pretrained(tmp_path / "art")
    with pytest.raises(AecompressError, match="exists and is not an empty folder"):
        aecompress.export_dense(tmp_path / "art", tmp_path / "art")


def pruned_attention_artifact(tokenizer, path, pairs: str = "low", method: str = "attn-dims"):
    """A tiny Llama whose attentions all keep the same rotary pairs (attn-dims), with its
    MLPs pruned too when `method` says so; returns the kept head dims."""
    cm = compressed_tiny(
        tokenizer,
        "llama",
        method=method,
        ratio=1.5,
        targets=["attn"],
        options={"attn-dims": {"pairs": pairs}} if "=" in method else {"pairs": pairs},
        calibration={"samples": 8, "seq_len": 32, "batch_size": 4},
        storage_dtype="float32",
    )
    cm.save_pretrained(path)
    return {g.stored.width for g in cm.groups if g.group.family == "attn"}


@pytest.mark.parametrize(
    ("pairs", "method"),
    [("low", "attn-dims"), ("high", "attn-dims"), ("low", "attn=attn-dims;ffn=ffn-neurons")],
)
def test_export_dense_of_pruned_attentions_is_a_smaller_plain_model(
    tokenizer, tmp_path, pairs, method
):
    (width,) = pruned_attention_artifact(tokenizer, tmp_path / "art", pairs, method)
    aecompress.export_dense(tmp_path / "art", tmp_path / "plain")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "plain")
    original = tiny_model("llama").config
    assert config.head_dim == width < original.head_dim
    if "ffn" in method:
        assert config.intermediate_size < original.intermediate_size
    rope = config.rope_parameters
    assert rope["rope_type"] == ("linear" if pairs == "low" else "default")
    expected = aecompress.load(tmp_path / "art")(input_ids=torch.tensor(IDS)).logits
    logits = plain_logits(tmp_path / "plain", "LlamaForCausalLM")
    torch.testing.assert_close(logits, expected.flatten(), rtol=1e-4, atol=1e-5)


def test_attentions_keeping_other_pairs_have_no_plain_config(tokenizer, tmp_path):
    pruned_attention_artifact(tokenizer, tmp_path / "art")
    cm = aecompress.load_compressed(tmp_path / "art")
    member = cm.groups[1].stored.members[0]
    member["kept"] = pack_bits(torch.tensor([True, False, False, True]))  # pairs 0 and 3
    with pytest.raises(AecompressError, match=r"different rotary pairs.*pairs=low or pairs=high"):
        rotary_window(cm, tmp_path / "art")


def test_attentions_under_scaled_rope_have_no_plain_config(tokenizer, tmp_path):
    pruned_attention_artifact(tokenizer, tmp_path / "art")
    cm = aecompress.load_compressed(tmp_path / "art")
    assert rotary_window(cm, tmp_path / "art").start > 0  # pairs=low: the last ones
    cm.model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(AecompressError, match="RoPE of type 'yarn' has no plain config"):
        rotary_window(cm, tmp_path / "art")


def test_a_folder_linked_out_of_an_artifact_is_refused(sentence_artifact, tmp_path):
    _, art = sentence_artifact
    (tmp_path / "elsewhere").mkdir()
    for name in ("config.json", "secret.txt"):
        (tmp_path / "elsewhere" / name).write_text("{}")
    shutil.rmtree(art / "1_Pooling")
    (art / "1_Pooling").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AecompressError, match="1_Pooling is a link out of the folder"):
        aecompress.export_dense(art, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def pruned_mlps_artifact(tokenizer, path):
    """A tiny Llama whose MLPs all keep the same number of neurons (ffn-neurons)."""
    calibration = {"samples": 8, "seq_len": 32, "batch_size": 4}
    cm = compressed_tiny(
        tokenizer,
        "llama",
        method="ffn-neurons",
        ratio=1.5,
        targets=["ffn"],
        calibration=calibration,
    )
    cm.save_pretrained(path)
    return {g.stored.width for g in cm.groups}


def test_export_dense_of_pruned_mlps_is_a_smaller_plain_model(tokenizer, tmp_path):
    (width,) = pruned_mlps_artifact(tokenizer, tmp_path / "art")
    aecompress.export_dense(tmp_path / "art", tmp_path / "plain")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "plain")
    assert config.intermediate_size == width < tiny_model("llama").config.intermediate_size
    expected = aecompress.load(tmp_path / "art")(input_ids=torch.tensor(IDS)).logits
    logits = plain_logits(tmp_path / "plain", "LlamaForCausalLM")
    torch.testing.assert_close(logits, expected.flatten(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "step", "message"),
    [
        (pruned_mlps_artifact, 1, "uniform widths"),
        (pruned_attention_artifact, 2, r"different head dims.*pairs=low or pairs=high"),
    ],
    ids=["mlps", "attentions"],
)
def test_export_dense_refuses_blocks_of_different_widths(tokenizer, tmp_path, make, step, message):
    make(tokenizer, tmp_path / "art")
    manifest_path = tmp_path / "art" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["groups"][1]["width"] -= step
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(AecompressError, match=message):
        aecompress.export_dense(tmp_path / "art", tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
