"""End to end on the two embedded pretrained models (slower: a few per run)."""

import pytest
import torch

import aecompress
from aecompress.evaluation.perplexity import perplexity

pytestmark = pytest.mark.real


def test_smollm2_svd_artifact_round_trip(smollm2, tmp_path):
    ids = smollm2.tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    import copy

    model = copy.deepcopy(smollm2.model)
    cm = aecompress.compress(
        model, method="svd", ratio=2, targets=["k"], group="layers", progress=False
    )
    cm.tokenizer = smollm2.tokenizer
    expected = model(input_ids=ids).logits
    cm.save_pretrained(str(tmp_path / "art"))
    loaded = aecompress.load_compressed(tmp_path / "art")
    assert torch.equal(loaded.model(input_ids=ids).logits, expected)
    assert (
        loaded.groups[0].stored.shared["b"].shape[1] == 576
        and len(loaded.groups[0].group.members) == 30
    )
    result = perplexity(loaded.model, loaded.tokenizer, windows=1, seq_len=128, progress=False)
    assert 1 < result.perplexity < 1e4


def test_smollm2_dense_perplexity_is_sane(smollm2):
    result = perplexity(smollm2.model, smollm2.tokenizer, windows=2, seq_len=256, progress=False)
    assert 15 < result.perplexity < 60


def test_minilm_embedding_svd(minilm, tmp_path):
    import copy

    cm = aecompress.compress(
        copy.deepcopy(minilm.model), method="svd", ratio=10, targets=["embed"], progress=False
    )
    (group,) = cm.groups
    assert group.shape == (30522, 384) and group.ratio >= 10
    assert cm.tied_output is None
