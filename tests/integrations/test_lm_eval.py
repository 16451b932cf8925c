import pytest

import aecompress
from aecompress.evaluation.multiple_choice import (
    DELIMITER,
    continuation_logprobs,
    encode_pairs,
    load_items,
    multiple_choice,
)
from aecompress.integrations.lm_eval import LOCAL_TASKS, evaluate, main
from tests.conftest import tiny_model

LIMIT = 20


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("lm_eval") / "art"
    aecompress.compress(
        tiny_model("llama"),
        method="svd",
        ratio=2,
        targets=["embed", "down"],
        tokenizer=tokenizer,
        progress=False,
    ).save_pretrained(path)
    return path


@pytest.mark.parametrize("task", sorted(LOCAL_TASKS))
def test_lm_eval_scores_our_items_as_we_do(artifact, tokenizer, task):
    local = LOCAL_TASKS[task]
    found = evaluate(str(artifact), [local], limit=LIMIT, log_samples=True)
    model = aecompress.load(artifact)
    ours = multiple_choice(task, model, tokenizer, limit=LIMIT, progress=False)
    theirs = found["results"][local]
    assert ours == {
        "acc": pytest.approx(100 * theirs["acc,none"]),
        "acc_norm": pytest.approx(100 * theirs["acc_norm,none"]),
    }
    # the same items, prompts and per-choice log-likelihoods
    items = load_items(task, "test" if task == "arc-easy" else "validation")[:LIMIT]
    pairs = [(item.context, DELIMITER + choice) for item in items for choice in item.choices]
    samples = sorted(found["samples"][local], key=lambda sample: sample["doc_id"])
    assert [tuple(a) for s in samples for a in s["arguments"]] == pairs
    scores = continuation_logprobs(model, encode_pairs(tokenizer, pairs), pad_id=0, progress=False)
    assert [r[0] for s in samples for r in s["filtered_resps"]] == pytest.approx(scores, abs=1e-4)


def test_command_line_runs_the_aecompress_model_type(artifact, capsys):
    main(["--model_args", f"path={artifact}", "--tasks", "piqa_local", "--limit", "3"])
    out = capsys.readouterr().out
    assert "aecompress ({'path':" in out and "|piqa_local|" in out.replace(" ", "")
