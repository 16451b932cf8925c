"""stsb and fidelity: sentence-embedding tasks for encoders (see evaluation/sts.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from aecompress.data import STSB_FILES
from aecompress.evaluation.tasks.base import Count, Task, TaskOptions, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Pooling = Literal["mean", "cls", "max"] | None  # None: the model's sentence-transformers pooling


class StsbOptions(TaskOptions):
    split: str = "test"
    pooling: Pooling = None
    batch_size: Count = 64


class Stsb(Task):
    """Spearman and Pearson (x100) of the cosine of the two sentences' embeddings vs gold."""

    needs = "encoder"
    Options = StsbOptions

    def run(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        *,
        reference: PreTrainedModel | None,
        progress: bool,
    ) -> dict[str, float]:
        from aecompress.evaluation import sts

        return sts.stsb(model, tokenizer, progress=progress, **settings)


class FidelityOptions(TaskOptions):
    sentences: Count = 1000  # the first N distinct STS-B dev sentences
    pooling: Pooling = None
    batch_size: Count = 64


class Fidelity(Task):
    """Mean cosine between the model's and the dense reference's sentence embeddings."""

    needs = "encoder"
    Options = FidelityOptions
    needs_reference = True

    def run(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        *,
        reference: PreTrainedModel | None,
        progress: bool,
    ) -> dict[str, float]:
        assert reference is not None  # run_task checks it
        from aecompress.evaluation import sts

        return sts.fidelity(model, tokenizer, reference=reference, progress=progress, **settings)


STSB_SPLITS = {split: (STSB_FILES[split],) for split in ("test", "dev", "train")}

register(Stsb("stsb", ("spearman", "pearson"), STSB_SPLITS))
register(Fidelity("fidelity", ("cosine",), {"dev": STSB_SPLITS["dev"]}))
