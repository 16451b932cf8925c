"""The validation signal a method may select with: never a split that is reported."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.data import wikitext2_text
from aecompress.errors import AecompressError
from aecompress.evaluation.kinds import require
from aecompress.evaluation.perplexity import window_ids, windows_perplexity
from aecompress.evaluation.sts import stsb
from aecompress.models import is_causal_lm

# Few, short windows: the signal is computed once per candidate (e.g. per AE epoch).
VALIDATION_WINDOWS = 8
VALIDATION_SEQ_LEN = 256


def validation_metric(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None
) -> Callable[[], float]:
    """The model's validation metric as it stands, lower is better.

    Causal LMs: WikiText-2 *validation* perplexity over the first VALIDATION_WINDOWS
    windows of VALIDATION_SEQ_LEN tokens. Other models (sentence encoders): minus the STS-B
    *dev* Spearman (a model that can run neither gets the STS task's one-line error).
    """
    if tokenizer is None:
        raise AecompressError("selection by the validation metric needs the model's tokenizer")
    if is_causal_lm(model):
        ids = window_ids(
            tokenizer, wikitext2_text("validation"), VALIDATION_SEQ_LEN, VALIDATION_WINDOWS
        )
        return lambda: windows_perplexity(model, ids)
    require("encoder", model, "stsb")

    def sts_dev() -> float:
        was_training = model.training
        model.eval()
        try:
            return -float(stsb(model, tokenizer, split="dev", progress=False)["spearman"])
        finally:
            model.train(was_training)

    return sts_dev
