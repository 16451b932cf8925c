"""Fixtures shared by the artifact tests."""

import pytest

import aecompress
from tests.conftest import tiny_model


@pytest.fixture
def artifact(tokenizer, tmp_path):
    cm = aecompress.compress(
        tiny_model("bert"),
        method="svd",
        ratio=2,
        targets=["k"],
        progress=False,
        tokenizer=tokenizer,
    )
    cm.save_pretrained(str(tmp_path / "art"))
    return tmp_path / "art"


@pytest.fixture
def sentence_artifact(tmp_path, tokenizer):
    """An artifact of a sentence encoder: its pooling set-up in a subfolder."""
    tiny_model("bert-encoder").save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    (tmp_path / "encoder" / "modules.json").write_text("[]")
    (tmp_path / "encoder" / "1_Pooling").mkdir()
    (tmp_path / "encoder" / "1_Pooling" / "config.json").write_text("{}")
    cm = aecompress.compress(str(tmp_path / "encoder"), ratio=2, targets=["k"], progress=False)
    cm.save_pretrained(tmp_path / "art")
    return cm, tmp_path / "art"
