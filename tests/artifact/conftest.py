"""Fixtures shared by the artifact tests."""

import pytest

import aecompress
from tests.conftest import tiny_model


@pytest.fixture
def artifact(tmp_path):
    cm = aecompress.compress(
        tiny_model("bert"), method="svd", ratio=2, targets=["k"], progress=False
    )
    cm.save_pretrained(str(tmp_path / "art"))
    return tmp_path / "art"
