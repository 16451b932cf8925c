import json

import pytest
import torch
from safetensors import safe_open

import aecompress
from aecompress.artifact import MANIFEST, WEIGHTS, read_manifest
from aecompress.errors import AecompressError
from tests.conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("grouping", ["none", "layers"])
def test_round_trip_gives_identical_logits(arch, grouping, tokenizer, tmp_path, input_ids):
    model = tiny_model(arch)
    cm = aecompress.compress(
        model,
        method="svd",
        ratio=2.5,
        targets=FAMILIES[arch],
        group=grouping,
        tokenizer=tokenizer,
        progress=False,
    )
    expected = cm.model(input_ids=input_ids).logits
    cm.save_pretrained(str(tmp_path / "art"))
    loaded = aecompress.load(tmp_path / "art")
    assert torch.equal(loaded(input_ids=input_ids).logits, expected)
    decoded = aecompress.load(tmp_path / "art", decode=True)
    torch.testing.assert_close(decoded(input_ids=input_ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_manifest_ratios_match_the_stored_tensors(tmp_path):
    cm = aecompress.compress(
        tiny_model("llama"), method="svd", ratio=2, targets=["embed", "down"], progress=False
    )
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


def test_truncated_or_foreign_artifacts_fail_clearly(tmp_path):
    cm = aecompress.compress(
        tiny_model("bert"), method="svd", ratio=2, targets=["k"], progress=False
    )
    cm.save_pretrained(str(tmp_path / "art"))
    weights = tmp_path / "art" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AecompressError, match="truncated"):
        aecompress.load(tmp_path / "art")
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        aecompress.load(tmp_path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        aecompress.load(tmp_path / "foreign")


def test_writes_are_atomic_and_never_clobber_foreign_folders(tmp_path, monkeypatch):
    cm = aecompress.compress(
        tiny_model("bert"), method="svd", ratio=2, targets=["k"], progress=False
    )
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        cm.save_pretrained(str(tmp_path / "keep"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("aecompress.artifact.save_file", crash)
    with pytest.raises(OSError):
        cm.save_pretrained(str(tmp_path / "art"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_overwriting_an_artifact_replaces_it(tmp_path, input_ids):
    for ratio in (2, 4):
        cm = aecompress.compress(
            tiny_model("bert"), method="svd", ratio=ratio, targets=["k"], progress=False
        )
        cm.save_pretrained(str(tmp_path / "art"))
    assert read_manifest(tmp_path / "art")["recipe"]["ratio"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
