"""The manifest: its counts match the weights file; forged or damaged ones are one error."""

import json

import pytest
import torch
from safetensors import safe_open

import aecompress
from aecompress.artifact import MANIFEST, WEIGHTS, read_manifest
from aecompress.errors import AecompressError
from tests.conftest import compressed_tiny


def test_manifest_ratios_match_the_stored_tensors(tokenizer, tmp_path):
    cm = compressed_tiny(tokenizer, "llama", targets=["embed", "down"])
    cm.save_pretrained(str(tmp_path / "art"))
    manifest = read_manifest(tmp_path / "art")
    with safe_open(str(tmp_path / "art" / WEIGHTS), framework="pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}  # noqa: SIM118
    for group in manifest["groups"]:
        prefix = f"aecompress.{group['name']}."
        stored = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith(prefix))
        members = len(group["members"])
        assert stored == group["stored_params"]
        assert group["ratio"] == pytest.approx(
            members * group["shape"][0] * group["shape"][1] / stored
        )
    assert manifest["tied_output"] == "lm_head"
    assert "lm_head.weight" not in shapes and "model.embed_tokens.weight" not in shapes
    assert manifest["totals"]["model_params_artifact"] == sum(
        torch.Size(s).numel() for s in shapes.values()
    )


def edit_manifest(folder, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("groups"), "groups"),
        (lambda m: m.update(format_version="2"), "format_version"),
        (lambda m: m.update(auto_class="AutoModelForSpeechSeq2Seq"), "auto_class"),
        (lambda m: m["weights_files"][0].update(name="../elsewhere.safetensors"), "file name"),
        (lambda m: m.update(colour="red"), "colour"),
        (lambda m: m["groups"][0]["members"][0].update(path="no.such.module"), "not a 'k' matrix"),
        (lambda m: m["groups"][0]["members"][0].update(kind="embedding"), "not a 'k' matrix"),
        (lambda m: m["groups"][0]["members"][0].update(layer=1), "not a 'k' matrix"),
        (lambda m: m["groups"][0].update(family="q"), "not a 'q' matrix"),
        (lambda m: m["groups"][0].update(width=99), "width 99 is not what it stores"),
        (lambda m: m["groups"][0].update(width=[2, 2]), "is not what it stores"),
        (lambda m: m.update(storage_dtype="float16"), "holds float32 tensors"),
        (lambda m: m.update(tied_output="bert.encoder"), "not the output head"),
        (lambda m: m["files"].append("vocab.json"), "vocab.json, a file of the artifact"),
        (lambda m: m["files"].append("/etc/passwd"), "'/etc/passwd' is not a path inside"),
        (lambda m: m["files"].append("../art/config.json"), "is not a path inside"),
        (lambda m: m["files"].append("1_Pooling//x"), "is not a path inside"),
        (lambda m: m["recipe"].update(targets=[None]), "recipe.targets.0"),
        (lambda m: m["groups"][0].update(ratio=99.0), "ratio is wrong"),
        (lambda m: m["groups"][0].update(stored_params=1), "counts are wrong"),
        (lambda m: m["groups"][0].update(stored_bits=64), "counts are wrong"),
        (lambda m: m["groups"][0].update(number_ratio=99.0), "number_ratio is wrong"),
        (lambda m: m["groups"][0]["tensors"].update({"0.a": [1, 1]}), "tensors do not match"),
        (lambda m: m["groups"].append(m["groups"][0]), r"groups k\.0 and k\.0 would share"),
        (
            lambda m: m["groups"].append({**m["groups"][0], "name": "k.0.a"}),
            r"k\.0 and k\.0\.a would",
        ),
    ],
)
def test_a_forged_or_damaged_manifest_is_one_clear_error(artifact, change, message):
    from aecompress.summary import describe_artifact

    edit_manifest(artifact, change)
    with pytest.raises(AecompressError, match=message):
        aecompress.load(artifact)
    with pytest.raises(AecompressError, match=message):
        describe_artifact(artifact)


def test_a_manifest_that_is_a_list_or_missing_weights_is_refused(artifact):
    from aecompress.summary import describe_artifact

    (artifact / WEIGHTS).unlink()
    with pytest.raises(AecompressError, match="missing"):
        describe_artifact(artifact)
    (artifact / MANIFEST).write_text("[1, 2]")
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        aecompress.load(artifact)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q: q["stage"].update(bits=3), "width .* is not what it stores"),
        (lambda q: q["stage"].update(group=32), "width .* is not what it stores"),
        (lambda q: q["stage"].update(bits=12), "quantize.stage.bits"),
        (lambda q: q.pop("cols"), "quantize.cols"),
    ],
)
def test_a_forged_quantization_stage_is_one_clear_error(tmp_path, tokenizer, change, message):
    """The stage recorded in a group's layout sets what its integer tensors must store."""
    cm = compressed_tiny(tokenizer, "llama", targets=["down"], quantize="int4:g16")
    cm.save_pretrained(str(tmp_path / "art"))
    edit_manifest(tmp_path / "art", lambda m: change(m["groups"][0]["layout"]["quantize"]))
    with pytest.raises(AecompressError, match=message):
        aecompress.load(tmp_path / "art")
