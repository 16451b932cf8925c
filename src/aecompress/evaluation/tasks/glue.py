"""glue-NAME (fine-tuning) and glue-NAME-probe (a frozen-feature probe) for encoders, on the
GLUE tasks of evaluation/glue.py: train split to fit, dev split reported; fine-tuning also
scores a held-out share of train (split `heldout`), on which settings are chosen."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from aecompress.data import GLUE_TASKS
from aecompress.errors import AecompressError
from aecompress.evaluation.tasks.base import TASKS, Count, Real, Seed, Task, TaskOptions, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class FinetuneOptions(TaskOptions):
    # dev: train on the train split, score dev (reported); heldout: train on train less a
    # seeded `heldout` share of it, score that share (for choosing settings; dev unseen)
    split: Literal["dev", "heldout"] = "dev"
    heldout: Real = Field(default=0.1, gt=0, lt=1)
    heldout_seed: Seed = 0
    epochs: Count = 3
    lr: Real = Field(default=2e-5, gt=0)
    batch_size: Count = 32
    grad_accum: Count = 2  # batches per optimizer step
    max_length: Count = 128  # tokens per example (truncated)
    warmup_ratio: Real = Field(default=0.1, ge=0, le=1)
    train_fraction: Real = Field(default=1.0, gt=0, le=1)  # a seeded random share of train
    seed: Seed = 0
    pooling: Literal["auto", "cls", "mean", "max"] = "auto"


class Finetune(Task):
    """Fine-tune a copy of the model with a new head on the train split, dev metrics."""

    needs = "encoder"
    Options = FinetuneOptions

    def run(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        *,
        reference: PreTrainedModel | None,
        progress: bool,
    ) -> dict[str, float]:
        from aecompress.evaluation import glue

        name = self.name.removeprefix("glue-")
        return glue.glue(name, model, tokenizer, progress=progress, **settings)


class ProbeOptions(TaskOptions):
    max_train: int | None = Field(default=4000, ge=2)  # a random subset of train (None: all)
    pooling: Literal["auto", "cls", "mean", "max"] = "mean"
    pairs: Literal["joint", "separate"] = "separate"
    l2: Real | None = Field(default=None, gt=0)  # None: chosen by cross-validation on train
    folds: int = Field(default=5, ge=2)
    batch_size: Count = 32
    max_length: Count = 128
    seed: Seed = 0


PROBE_NOTE = (
    "glue-*-probe: a frozen-feature probe, not the paper's fine-tuning: a logistic (ridge for "
    "STS-B) head on the frozen encoder's mean-pooled features of at most max_train (4000) "
    "train examples, dev metric; `evaluate --probe` runs it for the glue-* tasks given."
)


class Probe(Task):
    """A linear head on the frozen encoder's pooled train features, dev metrics."""

    needs = "encoder"
    Options = ProbeOptions
    note = PROBE_NOTE

    def run(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        *,
        reference: PreTrainedModel | None,
        progress: bool,
    ) -> dict[str, float]:
        name = self.name.removeprefix("glue-").removesuffix("-probe")
        from aecompress.evaluation import glue

        return glue.probe(name, model, tokenizer, progress=progress, **settings)


def probe_tasks(names: list[str]) -> list[str]:
    """`names` with each GLUE fine-tuning task replaced by its frozen-feature probe (other
    tasks kept); a one-line AecompressError if none of them has a probe."""
    probes = [f"{name}-probe" if f"{name}-probe" in TASKS else name for name in names]
    if not any(name.endswith("-probe") and name in TASKS for name in probes):
        raise AecompressError(
            f"--probe applies to the glue-* tasks (got {', '.join(names) or 'no task'})"
        )
    return probes


for _name, _spec in GLUE_TASKS.items():
    register(
        Finetune(f"glue-{_name}", _spec.metrics, {"dev": _spec.files, "heldout": _spec.files[:1]})
    )
for _name, _spec in GLUE_TASKS.items():
    register(Probe(f"glue-{_name}-probe", _spec.metrics, {"dev": _spec.files}))
