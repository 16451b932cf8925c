import pytest

from aecompress.errors import AecompressError
from aecompress.evaluation.kinds import model_kinds, require


def test_model_kinds(tiny_bert, tiny_bert_mlm, tiny_llama, tiny_gpt2) -> None:
    assert model_kinds(tiny_bert) == {"encoder"}
    assert model_kinds(tiny_bert_mlm) == {"encoder", "masked-lm"}
    assert model_kinds(tiny_llama) == model_kinds(tiny_gpt2) == {"causal-lm"}
    assert model_kinds(tiny_gpt2.transformer) == frozenset()


def test_require_names_the_task_and_what_the_model_is(tiny_bert, tiny_gpt2) -> None:
    require("encoder", tiny_bert, "stsb")
    with pytest.raises(AecompressError) as refused:
        require("masked-lm", tiny_bert, "mlm")
    assert str(refused.value) == (
        "task 'mlm' needs a masked-LM head; this model (BertModel) is a bidirectional "
        "(BERT-like) encoder"
    )
    with pytest.raises(AecompressError, match=r"\(GPT2Model\) is none of these"):
        require("causal-lm", tiny_gpt2.transformer, "piqa")
