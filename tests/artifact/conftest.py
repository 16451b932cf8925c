"""Fixtures shared by the artifact tests, and the logits of an export loaded without
aecompress."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aecompress
from tests.conftest import compressed_tiny, tiny_model

IDS = [[5, 17, 42, 7, 99, 3]]

# A fresh interpreter in which importing aecompress fails: prints the logits of IDS through
# the model of folder argv[1], loaded by transformers' class argv[2] in dtype argv[3].
PLAIN_LOAD = f"""
import sys
sys.modules["aecompress"] = None
import torch, transformers
auto = getattr(transformers, sys.argv[2])
model = auto.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[3])).eval()
with torch.no_grad():
    print(model(input_ids=torch.tensor({IDS})).logits.float().flatten().tolist())
"""


def plain_logits(folder: Path, auto_class: str, dtype: str = "float32") -> torch.Tensor:
    """The flat logits of IDS through the exported model in `folder`, computed by plain
    transformers in a subprocess that cannot import aecompress."""
    script = [sys.executable, "-c", PLAIN_LOAD, str(folder), auto_class, dtype]
    printed = subprocess.run(script, capture_output=True, text=True, check=True).stdout
    return torch.tensor(json.loads(printed))


@pytest.fixture
def artifact(tokenizer, tmp_path):
    cm = compressed_tiny(tokenizer)
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
