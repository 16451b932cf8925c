"""Saving: atomic writes, replacing an artifact but never a foreign folder, no NaN saved."""

import pytest
import torch

import aecompress
from aecompress.artifact import read_manifest
from aecompress.errors import AecompressError
from tests.conftest import compressed_tiny, tiny_model


def test_writes_are_atomic_and_never_clobber_foreign_folders(tokenizer, tmp_path, monkeypatch):
    cm = compressed_tiny(tokenizer)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        cm.save_pretrained(str(tmp_path / "keep"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("aecompress.artifact.weights.write_safetensors", crash)
    with pytest.raises(OSError):
        cm.save_pretrained(str(tmp_path / "art"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_overwriting_an_artifact_replaces_it(tokenizer, tmp_path, input_ids):
    for ratio in (2, 4):
        cm = compressed_tiny(tokenizer, ratio=ratio)
        cm.save_pretrained(str(tmp_path / "art"))
    assert read_manifest(tmp_path / "art")["recipe"]["ratio"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_overwriting_refuses_a_folder_with_foreign_files_and_cleans_leftovers(
    tokenizer, artifact, tmp_path
):
    cm = compressed_tiny(tokenizer, ratio=3)
    (artifact / "notes.txt").write_text("mine")
    with pytest.raises(AecompressError, match=r"notes\.txt"):
        cm.save_pretrained(str(artifact))
    (artifact / "notes.txt").unlink()
    stale = [tmp_path / ".art.tmp-999999999-x", tmp_path / ".art.old-999999999"]
    for folder in stale:
        folder.mkdir()
    cm.save_pretrained(str(artifact))
    assert not any(folder.exists() for folder in stale)
    assert read_manifest(artifact)["recipe"]["ratio"] == 3


def test_values_beyond_the_storage_dtype_are_not_saved(tokenizer, tmp_path):
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.key.weight[0, 0] = 1e6  # > float16's max
    cm = aecompress.compress(
        model,
        method="svd",
        ratio=2,
        targets=["k"],
        storage_dtype="float16",
        progress=False,
        tokenizer=tokenizer,
    )
    with pytest.raises(AecompressError, match="NaN or infinite values in float16"):
        cm.save_pretrained(tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_files_in_an_artifacts_subfolders_are_its_own_or_kept(sentence_artifact):
    cm, art = sentence_artifact
    assert "1_Pooling/config.json" in read_manifest(art)["files"]
    cm.save_pretrained(art)  # its own files: replaced
    (art / "1_Pooling" / "notes.txt").write_text("mine")
    with pytest.raises(AecompressError, match=r"not part of its artifact \(1_Pooling/notes\.txt"):
        cm.save_pretrained(art)
    assert (art / "1_Pooling" / "notes.txt").read_text() == "mine"
