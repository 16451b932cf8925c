"""wikitext2: causal-LM perplexity on WikiText-2 raw (see evaluation/perplexity.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aecompress.data import WIKITEXT2_FILES
from aecompress.evaluation.tasks.base import Count, Task, TaskOptions, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from aecompress.evaluation.common import Forward


class Wikitext2Options(TaskOptions):
    split: str = "test"
    seq_len: Count = 512  # tokens per window
    windows: Count | None = 16  # the first N windows (None: all)
    full: bool = False  # every window, whatever `windows` says
    batch_size: Count = 4


class Wikitext2(Task):
    """Token-level perplexity on the joined WikiText-2 raw split: the first `windows`
    non-overlapping windows of `seq_len` tokens, or all of them with `full`."""

    needs = "causal-lm"
    Options = Wikitext2Options
    streams = True

    def run(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        *,
        reference: PreTrainedModel | None,
        progress: bool,
    ) -> dict[str, float]:
        return self.measure(model, tokenizer, settings, forward=None, progress=progress)

    def measure(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        *,
        forward: Forward | None,
        progress: bool,
    ) -> dict[str, float]:
        from aecompress.evaluation.perplexity import perplexity

        result = perplexity(
            model,
            tokenizer,
            split=settings["split"],
            seq_len=settings["seq_len"],
            windows=None if settings["full"] else settings["windows"],
            batch_size=settings["batch_size"],
            progress=progress,
            forward=forward,
        )
        return {"perplexity": result.perplexity}


WIKITEXT2_SPLITS = {split: (WIKITEXT2_FILES[split],) for split in ("test", "validation", "train")}

register(Wikitext2("wikitext2", ("perplexity",), WIKITEXT2_SPLITS))
