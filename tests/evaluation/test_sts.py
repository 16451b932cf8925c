import copy
import json

import pytest
import torch

from aecompress.evaluation.sts import (
    Pooling,
    embed,
    fidelity,
    fidelity_sentences,
    read_stsb,
    sentence_pooling,
    stsb,
)
from aecompress.models import load_model


def test_read_stsb_test_split() -> None:
    pairs = read_stsb("test")
    assert len(pairs.first) == len(pairs.second) == len(pairs.scores) == 1379
    assert pairs.scores.min() >= 0 and pairs.scores.max() <= 5
    assert pairs.first[0] == "A girl is styling her hair."


def test_pooling_follows_the_sentence_transformers_files(tmp_path, tokenizer) -> None:
    model = load_model("minilm-l6").model
    assert sentence_pooling(model, tokenizer) == Pooling("mean", 256)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(
        json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )
    (tmp_path / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    model.name_or_path = str(tmp_path)
    assert sentence_pooling(model, tokenizer) == Pooling("cls", 512)
    assert sentence_pooling(model, tokenizer, "max") == Pooling("max", 512)


def test_embeddings_do_not_depend_on_batching(tokenizer, tiny_bert) -> None:
    sentences = ["A short one.", "A much longer sentence that forces padding of the others."]
    together = embed(tiny_bert, tokenizer, sentences, Pooling(), progress=False)
    alone = embed(tiny_bert, tokenizer, sentences[:1], Pooling(), progress=False)
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


def test_stsb_reports_both_correlations(tokenizer, tiny_bert) -> None:
    result = stsb(tiny_bert, tokenizer, split="dev", progress=False)
    assert set(result) == {"spearman", "pearson"}
    assert all(-100 <= value <= 100 for value in result.values())


def test_fidelity(tokenizer, tiny_bert) -> None:
    same = fidelity(tiny_bert, tokenizer, reference=tiny_bert, sentences=20, progress=False)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-5)
    noisy = copy.deepcopy(tiny_bert)
    with torch.no_grad():
        noisy.embeddings.word_embeddings.weight.add_(0.05 * torch.randn(30522, 32))
    changed = fidelity(noisy, tokenizer, reference=tiny_bert, sentences=20, progress=False)
    assert changed["cosine"] < 0.999
    assert len(fidelity_sentences(20)) == 20


@pytest.mark.real
def test_dense_minilm_stsb_test_is_the_published_82_03() -> None:
    loaded = load_model("minilm-l6")
    result = stsb(loaded.model, loaded.tokenizer, progress=False)
    assert round(result["spearman"], 2) == 82.03
