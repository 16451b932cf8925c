"""mlm: masked-LM perplexity with whole-word masking on WikiText-2 raw (see
evaluation/mlm.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from aecompress.evaluation.tasks.base import Count, Real, Seed, Task, TaskOptions, register
from aecompress.evaluation.tasks.wikitext2 import WIKITEXT2_SPLITS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class MaskedLMOptions(TaskOptions):
    split: str = "test"
    seq_len: Count = 512
    mask_prob: Real = Field(default=0.15, gt=0, le=1)  # share of each chunk's words masked
    seed: Seed = 0  # of the masks
    limit: Count | None = None  # the first N non-empty rows (None: all)
    batch_size: Count = 8


class MaskedLM(Task):
    """Masked-LM perplexity over the masked tokens of the first `limit` rows of a split."""

    needs = "masked-lm"
    Options = MaskedLMOptions

    def run(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        *,
        reference: PreTrainedModel | None,
        progress: bool,
    ) -> dict[str, float]:
        from aecompress.evaluation.mlm import masked_lm_perplexity

        return masked_lm_perplexity(model, tokenizer, progress=progress, **settings)


register(MaskedLM("mlm", ("perplexity",), WIKITEXT2_SPLITS))
