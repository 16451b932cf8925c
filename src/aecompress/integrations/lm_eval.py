"""lm-evaluation-harness 0.4.x on aecompress models, offline (`pip install 'aecompress[lm-eval]'`).

The model type `aecompress` loads an artifact folder (or any model `aecompress evaluate`
takes) and hands it to lm-eval's HFLM; the local tasks `arc_easy_local`, `piqa_local` and
`hellaswag_local` are lm-eval's arc_easy, piqa and hellaswag over the files in aecompress's
data folder (YAML in lm_eval_tasks/):

    python -m aecompress.integrations.lm_eval --model_args path=out/ --tasks arc_easy_local

No special token is added to the text (`add_bos_token=False`, aecompress's own convention;
`--model_args path=out/,add_bos_token=True` for lm-eval's default), so lm-eval's acc and
acc_norm (and their standard errors) equal `aecompress evaluate --task arc-easy` on the same
items.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

from aecompress.errors import AecompressError
from aecompress.evaluation.common import pad_token_id
from aecompress.evaluation.multiple_choice import (
    accuracies,
    choice_pairs,
    continuation_logprobs,
    encode_pairs,
    load_items,
)
from aecompress.evaluation.runner import load_evaluated
from aecompress.models import is_causal_lm

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
# aecompress task -> the local lm-eval task over the same items
LOCAL_TASKS = {"arc-easy": "arc_easy_local", "piqa": "piqa_local", "hellaswag": "hellaswag_local"}
LOCAL = set(LOCAL_TASKS.values())


@cache
def model_class() -> type:
    """lm-eval's HFLM over a model that aecompress loads (artifact, name, folder, .gguf)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise AecompressError(
            "lm-eval is not installed: pip install 'aecompress[lm-eval]'"
        ) from error

    class AecompressLM(HFLM):
        def __init__(self, path: str | None = None, decode: bool = False, **kwargs: Any) -> None:
            if path is None:
                raise AecompressError("name the model: --model_args path=ARTIFACT_OR_MODEL")
            loaded = load_evaluated(path, decode=decode)
            if not is_causal_lm(loaded.model) or loaded.tokenizer is None:
                raise AecompressError(f"lm-eval needs a causal LM with a tokenizer: {path}")
            tokenizer = loaded.tokenizer
            if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
                kwargs.setdefault("prefix_token_id", pad_token_id(tokenizer))
            kwargs.setdefault("add_bos_token", False)
            kwargs.setdefault("device", "cpu")
            super().__init__(pretrained=loaded.model, tokenizer=tokenizer, **kwargs)

    return AecompressLM


def evaluate(
    path: str,
    tasks: list[str],
    *,
    limit: int | None = None,
    decode: bool = False,
    batch_size: int = 16,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's simple_evaluate of the model at `path` on tasks (local ones included);
    returns lm-eval's results dictionary."""
    model = model_class()(path, decode=decode, batch_size=batch_size)
    return _simple_evaluate(model, tasks, limit, log_samples)


def _simple_evaluate(
    model: Any, tasks: list[str], limit: int | None, log_samples: bool
) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        tasks=tasks,
        limit=limit,
        task_manager=TaskManager(  # lm-eval's own tasks indexed only when asked for
            include_path=str(TASKS_DIR), include_defaults=not set(tasks) <= LOCAL
        ),
        log_samples=log_samples,
    )


REPORTED = ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")  # as percentages


def compare(
    path: str, task: str = "arc-easy", *, limit: int | None = None, batch_size: int = 16
) -> dict[str, Any]:
    """Our `task` and lm-eval's local one on the first `limit` items, one model loaded once:
    both accuracies and their standard errors (percent), whether the prompts are the same,
    and the largest difference of a choice's log-likelihood."""
    model = model_class()(path, batch_size=batch_size)
    local = LOCAL_TASKS[task]
    found = _simple_evaluate(model, [local], limit, log_samples=True)
    items = load_items(task)[:limit]
    pairs = choice_pairs(items)
    tokenizer = model.tokenizer
    ours = continuation_logprobs(
        model.model,
        encode_pairs(tokenizer, pairs),
        pad_id=pad_token_id(tokenizer),
        batch_size=batch_size,
        progress=False,
    )
    samples = sorted(found["samples"][local], key=lambda sample: sample["doc_id"])
    theirs = [resp[0] for sample in samples for resp in sample["filtered_resps"]]
    metrics = found["results"][local]
    return {
        "items": len(items),
        "ours": accuracies(items, ours),
        "lm_eval": {name: 100 * metrics[f"{name},none"] for name in REPORTED},
        "same_prompts": [tuple(a) for s in samples for a in s["arguments"]] == pairs,
        "max_loglikelihood_difference": max(abs(a - b) for a, b in zip(ours, theirs, strict=True)),
    }


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `--model aecompress` and the local tasks added (other
    arguments as for `lm_eval`)."""
    try:
        model = model_class()
    except AecompressError as error:
        _fail(error)
    from lm_eval.api.registry import register_model

    register_model("aecompress")(model)
    args = sys.argv[1:] if argv is None else argv
    if "--model" not in args:
        args = ["--model", "aecompress", *args]
    if "--include_path" not in args:
        args = [*args, "--include_path", str(TASKS_DIR)]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", "run", *args]
    try:
        cli_evaluate()
    except AecompressError as error:
        _fail(error)


def _fail(error: AecompressError) -> NoReturn:
    """One `aecompress: error:` line on stderr and exit status 2, as the aecompress CLI."""
    print(f"aecompress: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
