"""export_compressed_tensors: gptq / rtn artifacts in the compressed-tensors format, loaded by
plain transformers (with the compressed-tensors package) to the artifact's logits.

transformers 5.25 with compressed-tensors 0.20.1 cannot load asymmetric pack-quantized
layers (it expects the zero points unpacked; the package's own checkpoints fail alike), so
asymmetric exports are read back by the package's own decompressor."""

import json

import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file

import aecompress
from aecompress.artifact import PREFIX, WEIGHTS, read_manifest
from aecompress.errors import AecompressError
from aecompress.models import LoadedModel
from tests.artifact.conftest import IDS, plain_logits
from tests.conftest import make_tiny

CALIBRATION = {"samples": 8, "seq_len": 32, "batch_size": 4}
LINEAR = ["q", "k", "v", "o", "up", "gate", "down"]
NAMES = {"codes": "packed", "scales": "scale", "zeros": "zero_point"}  # ours: compressed-tensors'


def _artifact(tokenizer, tmp_path, method, options):
    loaded = LoadedModel(
        make_tiny("llama", vocab=tokenizer.vocab_size), tokenizer, "tiny", "AutoModelForCausalLM"
    )
    cm = aecompress.compress(
        loaded,
        method=method,
        options=options,
        ratio=2,
        targets=LINEAR,
        calibration=CALIBRATION,
        progress=False,
    )
    cm.save_pretrained(tmp_path / "art")
    return tmp_path / "art"


@pytest.mark.parametrize(
    "method,options,schemes",
    [
        ("gptq", {"bits": 4, "group": 32}, 1),
        ("gptq", {"bits": 4, "group": "row"}, 1),
        (  # two schemes; 3-bit codes straddle int32 words
            "q,k,v,o,up,gate=gptq;down=rtn",
            {"gptq": {"bits": 4, "group": 32}, "rtn": {"bits": 3, "group": "row"}},
            2,
        ),
    ],
)
def test_an_export_loads_in_plain_transformers_to_the_artifacts_logits(
    tokenizer, tmp_path, method, options, schemes
):
    art = _artifact(tokenizer, tmp_path, method, options)
    aecompress.export_compressed_tensors(art, tmp_path / "ct")
    plain = plain_logits(tmp_path / "ct", "AutoModelForCausalLM")
    with torch.no_grad():
        decoded = aecompress.load(art, decode=True)(input_ids=torch.tensor(IDS)).logits.flatten()
        packed = aecompress.load(art)(input_ids=torch.tensor(IDS)).logits.flatten()
    # transformers decompresses to the same fp32 weights: equal up to float32 rounding
    torch.testing.assert_close(plain, decoded, rtol=1e-3, atol=1e-5)
    # the served int4 kernel rounds its inputs and outputs to bf16 (2^-9 relative)
    torch.testing.assert_close(plain, packed, rtol=0, atol=1e-2 * decoded.abs().max().item())
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    quantization = config["quantization_config"]
    assert config["dtype"] == "bfloat16" and quantization["ignore"] == ["lm_head"]
    assert len(quantization["config_groups"]) == schemes


def test_an_asymmetric_export_holds_the_stored_tensors_that_compressed_tensors_decodes(
    tokenizer, tmp_path
):
    art = _artifact(tokenizer, tmp_path, "gptq", {"bits": 3, "group": 32, "symmetric": False})
    aecompress.export_compressed_tensors(art, tmp_path / "ct")
    stored, exported = load_file(art / WEIGHTS), load_file(tmp_path / "ct" / WEIGHTS)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    decoded = aecompress.load(art, decode=True)
    for entry in read_manifest(art)["groups"]:
        for index, member in enumerate(entry["members"]):
            ours, theirs = f"{PREFIX}{entry['name']}.{index}.", f"{member['path']}.weight_"
            module = {
                f"weight_{ct_name}": exported.pop(theirs + ct_name)
                for ct_name in ("packed", "scale", "zero_point", "shape")
            }
            for name, ct_name in NAMES.items():
                assert torch.equal(module[f"weight_{ct_name}"], stored.pop(ours + name))
            assert module["weight_shape"].tolist() == entry["shape"]
            module["weight_scale"] = module["weight_scale"].float()  # (code - zero) * scale exact
            weight = PackedQuantizationCompressor.decompress(module, scheme)["weight"]
            assert torch.equal(weight, decoded.get_submodule(member["path"]).weight)
    assert exported.keys() == stored.keys()  # untouched: all but the tied head, once
    assert all(torch.equal(exported[key], stored[key]) for key in stored)


@pytest.mark.parametrize(
    "arch,method,refused",
    [
        ("llama", "embed=rtn;down=svd", r"not embed \(rtn on embedding layers\), down.0 \(svd\)"),
        ("gpt2", "up=rtn", r"not up.0 \(rtn on conv1d layers\), up.1"),
    ],
)
def test_groups_without_a_compressed_tensors_form_are_refused_before_any_work(
    tmp_path, tokenizer, arch, method, refused
):
    cm = aecompress.compress(
        make_tiny(arch), method=method, ratio=2, tokenizer=tokenizer, progress=False
    )
    cm.save_pretrained(tmp_path / "art")
    with pytest.raises(AecompressError, match=refused):
        aecompress.export_compressed_tensors(tmp_path / "art", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
