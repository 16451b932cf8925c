"""The weights files: one model.safetensors, or HF-style shards with their index; both read
back the same model, and version-3 manifests (one weights_file) still load."""

import json

import pytest
import torch
from safetensors import safe_open

import aecompress
from aecompress.artifact import MANIFEST, WEIGHTS, read_manifest
from aecompress.errors import AecompressError
from aecompress.summary import artifact_facts, describe_artifact
from aecompress.tensorfile import INDEX
from tests.conftest import compressed_tiny


@pytest.fixture
def sharded(tokenizer, tmp_path, monkeypatch):
    """A tiny Llama compressed on k and down, saved in shards of at most 20 kB."""
    monkeypatch.setattr("aecompress.artifact.save.SHARD_BYTES", 20_000)
    cm = compressed_tiny(tokenizer, "llama", targets=["k", "down"])
    cm.save_pretrained(tmp_path / "art")
    return cm, tmp_path / "art"


def test_a_sharded_artifact_loads_the_model_that_was_saved(sharded, input_ids):
    cm, folder = sharded
    manifest = read_manifest(folder)
    names = [record["name"] for record in manifest["weights_files"]]
    count = len(names)
    assert count > 2 and not (folder / WEIGHTS).exists()
    assert names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert manifest["totals"]["artifact_bytes"] == sum(
        (folder / name).stat().st_size for name in names
    )
    expected = cm.model(input_ids=input_ids).logits
    assert torch.equal(aecompress.load(folder)(input_ids=input_ids).logits, expected)


def test_the_index_maps_every_tensor_to_its_shard(sharded):
    _, folder = sharded
    index = json.loads((folder / INDEX).read_text())
    found, total = {}, 0
    for name in dict.fromkeys(index["weight_map"].values()):
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                found[key] = name
                total += handle.get_tensor(key).nbytes
    assert found == index["weight_map"]
    assert index["metadata"]["total_size"] == total


def test_inspect_counts_every_shard(sharded, tokenizer, tmp_path):
    _, folder = sharded
    single = tmp_path / "single"
    compressed_tiny(tokenizer, "llama", targets=["k", "down"]).save_pretrained(single)
    assert artifact_facts(folder)["totals"]["artifact_bytes"] == sum(
        f["bytes"] for f in read_manifest(folder)["weights_files"]
    )
    facts, single_facts = artifact_facts(folder), artifact_facts(single)
    for key in ("model_params_artifact", "stored_bits", "ratio"):
        assert facts["totals"][key] == single_facts["totals"][key]
    assert "shards" in describe_artifact(folder)


def test_a_damaged_shard_is_refused(sharded):
    _, folder = sharded
    shard = folder / read_manifest(folder)["weights_files"][1]["name"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(AecompressError, match=f"{shard.name} is truncated or altered"):
        aecompress.load(folder)


def test_a_version_3_manifest_still_loads(artifact, input_ids):
    expected = aecompress.load(artifact)(input_ids=input_ids).logits
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert len(manifest["weights_files"]) == 1
    manifest["weights_file"] = manifest.pop("weights_files")[0]
    manifest["format_version"] = 3
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    assert torch.equal(aecompress.load(artifact)(input_ids=input_ids).logits, expected)
    assert read_manifest(artifact)["weights_files"][0]["name"] == WEIGHTS
    assert WEIGHTS in describe_artifact(artifact)
