"""Compressing into a folder, streamed from disk a block at a time: the same stored tensors
as the model compressed whole, one block's weights in memory at a time, and one clear
line for what cannot stream."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import aecompress
from aecompress.artifact import MANIFEST, read_manifest
from aecompress.errors import AecompressError
from aecompress.streaming import CheckpointBlocks
from aecompress.tensorfile import INDEX
from tests.conftest import make_tiny, tiny_tokenizer
from tests.helpers import invoke, one_error

CALIBRATION = {"samples": 4, "seq_len": 32, "batch_size": 2}


def checkpoint(folder: Path, dtype: torch.dtype = torch.bfloat16, arch: str = "llama") -> Path:
    """A tiny random model and its tokenizer saved as a safetensors folder in `dtype`."""
    make_tiny(arch).to(dtype).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def stored_sha256(artifact: Path) -> dict[str, str]:
    """sha256 of every tensor in the artifact's weights files, by name."""
    found = {}
    for record in read_manifest(artifact)["weights_files"]:
        with safe_open(str(artifact / record["name"]), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                data = handle.get_tensor(key).contiguous().view(-1).view(torch.uint8)
                found[key] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    return found


def both_ways(folder: Path, out: Path, **recipe) -> tuple[Path, Path]:
    """The artifacts of `folder` compressed whole and streamed."""
    fields = {"calibration": CALIBRATION, "progress": False, **recipe}
    whole = aecompress.compress_to_folder(str(folder), out / "whole", stream=False, **fields)
    streamed = aecompress.compress_to_folder(str(folder), out / "streamed", stream=True, **fields)
    return whole, streamed


@pytest.mark.parametrize(
    ("dtype", "recipe"),
    [
        (torch.bfloat16, {"method": "sparsegpt", "ratio": 1.25, "targets": ["q", "up", "down"]}),
        (torch.float32, {"method": "svdllm", "ratio": 1.5, "targets": ["k", "gate"]}),
        (
            torch.bfloat16,
            {"method": "gptq", "ratio": 4, "targets": ["o", "up"], "pipeline": "sequential"},
        ),
        (torch.float32, {"method": "embed=svd;up,down=sparsegpt", "ratio": 1.25}),
        (
            torch.bfloat16,
            {
                "method": "svd",
                "ratio": 2,
                "targets": ["embed", "v"],
                "untie_embeddings": True,
                "pipeline": "sequential",
            },
        ),
    ],
)
def test_streamed_and_whole_store_the_same_tensors(tmp_path, dtype, recipe):
    whole, streamed = both_ways(checkpoint(tmp_path / "model", dtype), tmp_path, **recipe)
    assert stored_sha256(streamed) == stored_sha256(whole)
    one, other = read_manifest(whole), read_manifest(streamed)
    for key in ("base_weights_sha256", "groups", "aliases", "tied_output", "storage_dtype"):
        assert other[key] == one[key], key
    for key in ("model_params_artifact", "model_params_dense", "stored_bits", "ratio"):
        assert other["totals"][key] == one["totals"][key], key
    assert len(other["weights_files"]) > 1 and (streamed / INDEX).is_file()


def test_a_streamed_artifact_loads_the_model_the_whole_one_does(tmp_path, small_ids):
    recipe = {"method": "sparsegpt", "ratio": 1.25, "targets": ["up", "down"]}
    whole, streamed = both_ways(checkpoint(tmp_path / "model"), tmp_path, **recipe)
    expected = aecompress.load(whole)(input_ids=small_ids).logits
    assert torch.equal(aecompress.load(streamed)(input_ids=small_ids).logits, expected)


def test_one_block_is_in_memory_at_a_time(tmp_path, monkeypatch):
    loaded_at_once = []
    load = CheckpointBlocks.load

    def counting(self, index, device):
        load(self, index, device)
        blocks = [b for b in self.blocks if any(not p.is_meta for p in b.parameters())]
        loaded_at_once.append(len(blocks))

    monkeypatch.setattr(CheckpointBlocks, "load", counting)
    folder = checkpoint(tmp_path / "model")
    aecompress.compress_to_folder(
        str(folder),
        tmp_path / "art",
        method="sparsegpt",
        ratio=1.25,
        targets=["up"],
        calibration=CALIBRATION,
        stream=True,
        progress=False,
    )
    assert loaded_at_once == [1, 1]


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"method": "svd", "allocate": "sensitivity"}, "allocate: sensitivity"),
        ({"method": "svd", "pipeline": "independent"}, "independent pipeline"),
        ({"method": "gptq", "ratio": 4}, "independent pipeline"),  # auto picks it for gptq
        ({"method": "fwsvd"}, "Fisher / L1"),
        ({"method": "ae", "options": {"selection": "validation"}}, "selection: validation"),
    ],
)
def test_what_needs_the_whole_model_is_refused_when_streaming_is_forced(tmp_path, recipe, message):
    fields = {"ratio": 2, "targets": ["up"], "calibration": CALIBRATION, **recipe}
    folder = checkpoint(tmp_path / "model")
    with pytest.raises(AecompressError, match=f"cannot stream {folder}: .*{message}"):
        aecompress.compress_to_folder(str(folder), tmp_path / "art", stream=True, **fields)
    assert not (tmp_path / "art").exists()


def test_a_gguf_file_is_not_streamed(tmp_path):
    code, _, err = invoke("compress", "smollm2-135m", "-o", str(tmp_path / "a"), "--stream")
    assert "GGUF file is de-quantised whole" in one_error(code, err)


def test_auto_streams_when_the_model_would_not_fit(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("aecompress.streamed.available_memory", lambda: 1)
    folder = checkpoint(tmp_path / "model")
    fields = {"ratio": 1.25, "targets": ["up"], "calibration": CALIBRATION, "progress": False}
    with caplog.at_level(logging.WARNING):
        aecompress.compress_to_folder(str(folder), tmp_path / "a", method="sparsegpt", **fields)
        assert "streaming" in caplog.text and (tmp_path / "a" / INDEX).is_file()
        caplog.clear()
        aecompress.compress_to_folder(str(folder), tmp_path / "b", method="fwsvd", **fields)
    assert "not streaming" in caplog.text and "Fisher" in caplog.text
    assert json.loads((tmp_path / "b" / MANIFEST).read_text())["weights_files"][0]["name"] == (
        "model.safetensors"
    )


def test_the_command_line_streams_on_request(tmp_path):
    folder = checkpoint(tmp_path / "model")
    args = ["compress", str(folder), "--method", "sparsegpt", "--ratio", "1.25"]
    args += ["--targets", "up", "--calibration-samples", "4", "--calibration-seq-len", "32"]
    code, out, err = invoke(*args, "-o", str(tmp_path / "art"), "--stream")
    assert code == 0, err
    assert "2 groups" in out and (tmp_path / "art" / INDEX).is_file()


def test_compress_of_a_model_object_refuses_to_stream(tmp_path):
    with pytest.raises(AecompressError, match="compress_to_folder"):
        aecompress.compress(make_tiny("llama"), method="svd", ratio=2, targets=["k"], stream=True)


@pytest.mark.real
def test_smollm2_streamed_and_whole_store_the_same_tensors(smollm2, tmp_path):
    folder = tmp_path / "smollm2"  # a bf16 safetensors checkpoint (the GGUF's, de-quantised)
    config = copy.deepcopy(smollm2.model.config)
    del config.quantization_config  # transformers saves no GGUF-loaded model itself
    config.architectures = ["LlamaForCausalLM"]  # as a hub checkpoint's says
    config.save_pretrained(folder)
    state = smollm2.model.state_dict()
    del state["lm_head.weight"]  # tied to the embedding
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    smollm2.tokenizer.save_pretrained(folder)
    mlps = r"re:model\.layers\.(0|14|29)\.mlp\.(up|gate|down)_proj"  # 3 of 30: time
    recipe = {"method": "sparsegpt", "ratio": 1.25, "targets": [mlps]}
    text = tmp_path / "calibration.txt"  # a few sentences: no tokenising of WikiText-2
    text.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 40)
    calibration = {"samples": 2, "seq_len": 64, "batch_size": 2, "data": str(text)}
    whole, streamed = both_ways(folder, tmp_path, calibration=calibration, **recipe)
    assert stored_sha256(streamed) == stored_sha256(whole)
    assert read_manifest(streamed)["groups"] == read_manifest(whole)["groups"]
