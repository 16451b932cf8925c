"""What a model can be evaluated on: causal LM, masked-LM head, bidirectional encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aecompress.errors import AecompressError

if TYPE_CHECKING:
    from torch import nn

KINDS: dict[str, str] = {
    "causal-lm": "a causal LM",
    "masked-lm": "a masked-LM head",
    "encoder": "a bidirectional (BERT-like) encoder",
}


def model_kinds(model: nn.Module) -> frozenset[str]:
    """The kinds a model is, judged by its transformers class and model type.

    A model whose family has a masked-LM class in transformers (BERT, RoBERTa, ...) and
    that is not a causal LM is an encoder, with or without its MLM head.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from aecompress.models import is_causal_lm, is_masked_lm

    config = getattr(model, "config", None)
    kinds = set()
    if is_causal_lm(model):
        kinds.add("causal-lm")
    if is_masked_lm(model):
        kinds.add("masked-lm")
    if (
        "causal-lm" not in kinds
        and getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_decoder", False)
    ):
        kinds.add("encoder")
    return frozenset(kinds)


def require(need: str, model: nn.Module, task: str) -> None:
    """Raise a one-line error naming `task` unless `model` is of the kind `need`."""
    if need in model_kinds(model):
        return
    kinds = " and ".join(KINDS[kind] for kind in sorted(model_kinds(model))) or "none of these"
    raise AecompressError(
        f"task '{task}' needs {KINDS[need]}; this model ({type(model).__name__}) is {kinds}"
    )
