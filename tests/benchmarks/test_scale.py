import json

import pytest
import torch
import transformers

from tests.benchmarks.conftest import run_script


@pytest.mark.usefixtures("children_in_this_process")
def test_quick_run_measures_every_step_beside_its_estimate(tmp_path):
    run_script("scale", "--quick", "--out", str(tmp_path))
    facts = json.loads((tmp_path / "scale-quick.json").read_text())
    assert list(facts["steps"]) == ["imports", "svdllm", "sparsegpt"]
    assert facts["fp32_bytes"] > 0 and facts["quick"]
    assert all(step["peak_rss_bytes"] > 0 for step in facts["steps"].values())
    estimates = facts["steps"]["sparsegpt"]["estimates_gib"]
    assert set(estimates) == {"in memory", "streamed"} and estimates["in memory"] > 0
    assert facts["steps"]["sparsegpt"]["estimated_gib"] == estimates["in memory"]
    assert "smoke test" in (tmp_path / "scale-quick.md").read_text()


def test_the_checkpoint_is_written_layer_by_layer_and_loads(tmp_path):
    from scale import TINY, write_checkpoint

    folder = tmp_path / "model"
    total = write_checkpoint(folder, TINY, layers=2, dtype="bfloat16")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == total
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] == shards[1]
    assert index["weight_map"]["lm_head.weight"] == shards[2]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    weights = dict(model.named_parameters())
    assert len(model.model.layers) == 2
    assert total == sum(p.numel() for p in weights.values()) * 2  # bf16 on disk
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert 0.01 < down.std().item() < 0.03 and torch.equal(
        weights["model.norm.weight"], torch.ones(TINY["hidden_size"])
    )
    assert transformers.AutoTokenizer.from_pretrained(folder)("the cat")["input_ids"]


def test_a_shallower_view_links_the_first_layers(tmp_path):
    from scale import TINY, checkpoint

    root = tmp_path / "checkpoints"
    deep = checkpoint(root, TINY, 3, "float32")
    view = checkpoint(root, TINY, 1, "float32")
    assert (view / "view").exists() and all(f.is_symlink() for f in view.glob("*.safetensors"))
    load = transformers.AutoModelForCausalLM.from_pretrained
    shallow, full = load(view), load(deep)
    assert len(shallow.model.layers) == 1
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(shallow.state_dict()[layer], full.state_dict()[layer])
    assert torch.equal(shallow.lm_head.weight, full.lm_head.weight)
    assert checkpoint(root, TINY, 3, "float32") == deep  # written once
