"""arc-easy, piqa, hellaswag: zero-shot multiple choice for causal LMs, lm-eval's way (see
evaluation/multiple_choice.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aecompress.data import CHOICE_FILES
from aecompress.evaluation.tasks.base import Count, Task, TaskOptions, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from aecompress.evaluation.common import Forward


class ChoiceOptions(TaskOptions):
    split: str | None = None  # None: the task's default split
    limit: Count | None = None  # the first N items (None: all)
    batch_size: Count = 16


class MultipleChoice(Task):
    """Accuracy and length-normalised accuracy (with their standard errors) on a split."""

    needs = "causal-lm"
    Options = ChoiceOptions
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
        from aecompress.evaluation import multiple_choice

        return multiple_choice.multiple_choice(
            self.name, model, tokenizer, progress=progress, forward=forward, **settings
        )


for _name, _files in CHOICE_FILES.items():
    register(MultipleChoice(_name, ("acc", "acc_norm"), _files))
