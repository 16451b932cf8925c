import os
import subprocess
import sys
from pathlib import Path

import pytest

import aecompress
from aecompress.evaluation.multiple_choice import multiple_choice
from aecompress.integrations.lm_eval import LOCAL_TASKS, compare, main
from tests.conftest import tiny_model

LIMIT = 20


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("lm_eval") / "art"
    aecompress.compress(
        tiny_model("llama"),
        method="svd",
        ratio=2,
        targets=["embed", "down"],  # a tied head served from the embedding's factors
        tokenizer=tokenizer,
        progress=False,
    ).save_pretrained(path)
    return path


@pytest.mark.parametrize("task", sorted(LOCAL_TASKS))
def test_lm_eval_scores_our_items_as_we_do(artifact, tokenizer, task):
    found = compare(str(artifact), task, limit=LIMIT)
    assert found["items"] == LIMIT and found["same_prompts"]
    assert found["max_loglikelihood_difference"] < 1e-4
    assert found["ours"] == pytest.approx(found["lm_eval"])
    model = aecompress.load(artifact)  # the task as `aecompress evaluate` runs it
    assert multiple_choice(task, model, tokenizer, limit=LIMIT, progress=False) == found["ours"]


def test_command_line_runs_the_aecompress_model_type(artifact, capsys):
    main(["--model_args", f"path={artifact}", "--tasks", "piqa_local", "--limit", "3"])
    out = capsys.readouterr().out
    assert "aecompress ({'path':" in out and "|piqa_local|" in out.replace(" ", "")


def test_command_line_without_a_path_is_one_line_and_exit_2():
    """As a user runs it: its own process (lm-eval sets up logging there)."""
    source = Path(aecompress.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(source)}
    command = [sys.executable, "-m", "aecompress.integrations.lm_eval", "--tasks", "piqa_local"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("aecompress: error:")]
    assert done.returncode == 2 and len(errors) == 1 and "path=" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
