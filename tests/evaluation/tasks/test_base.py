import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aecompress.errors import AecompressError
from aecompress.evaluation.results import TaskResult
from aecompress.evaluation.tasks import (
    TASKS,
    Task,
    check_task,
    options_table,
    register,
    run_task,
    task_settings,
    task_table,
)
from aecompress.evaluation.tasks.glue import PROBE_NOTE
from aecompress.evaluation.tasks.wikitext2 import Wikitext2

WIKITEXT2_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


def test_unknown_task_lists_the_known_ones(tiny_llama) -> None:
    with pytest.raises(AecompressError, match=r"unknown task 'wikitext3': known tasks are .*piqa"):
        check_task("wikitext3", tiny_llama)


def test_task_that_does_not_fit_the_model(tiny_bert) -> None:
    with pytest.raises(AecompressError) as error:
        check_task("arc-easy", tiny_bert)
    assert str(error.value) == (
        "task 'arc-easy' needs a causal LM; this model (BertModel) can run: glue-mrpc, "
        "glue-rte, glue-stsb, glue-sst2, glue-cola, glue-mrpc-probe, glue-rte-probe, "
        "glue-stsb-probe, glue-sst2-probe, glue-cola-probe, stsb, fidelity"
    )


def test_missing_data_file(monkeypatch, tmp_path, tiny_bert, tokenizer) -> None:
    monkeypatch.setenv("AECOMPRESS_DATA", str(tmp_path))
    with pytest.raises(AecompressError, match=r"missing data file .*sts-test.csv"):
        run_task("stsb", tiny_bert, tokenizer, progress=False)


def test_bad_options_and_missing_reference(tiny_bert, tiny_llama, tokenizer) -> None:
    with pytest.raises(AecompressError, match="has no option limt"):
        run_task("piqa", tiny_llama, tokenizer, limt=3)
    with pytest.raises(AecompressError, match="has no split 'test': validation"):
        run_task("piqa", tiny_llama, tokenizer, split="test")
    with pytest.raises(AecompressError, match="needs the dense reference model"):
        run_task("fidelity", tiny_bert, tokenizer)
    with pytest.raises(AecompressError, match="needs the model's tokenizer"):
        run_task("stsb", tiny_bert, None)


def test_run_task_records_split_hashes_and_settings(tiny_llama, tokenizer) -> None:
    result = run_task("wikitext2", tiny_llama, tokenizer, windows=2, seq_len=64, progress=False)
    assert result.task == "wikitext2" and result.split == "test"
    assert tuple(result.metrics) == TASKS["wikitext2"].metrics
    assert result.metrics["perplexity"] > 1
    assert result.data_sha256 == {"wikitext-2-raw/wiki.test.raw": WIKITEXT2_TEST_SHA256}
    assert result.settings == {
        "split": "test",
        "seq_len": 64,
        "windows": 2,
        "full": False,
        "batch_size": 4,
    }
    assert result.seconds > 0
    assert TaskResult.from_json(result.to_json()) == result


def test_default_split_is_filled_in(tiny_llama, tokenizer) -> None:
    result = run_task("piqa", tiny_llama, tokenizer, limit=2, progress=False)
    assert result.split == result.settings["split"] == "validation"
    assert set(result.data_sha256) == {"piqa/valid.jsonl", "piqa/valid-labels.lst"}
    assert tuple(result.metrics) == TASKS["piqa"].metrics


def test_mlm_through_the_registry(tiny_bert_mlm, tokenizer) -> None:
    result = run_task("mlm", tiny_bert_mlm, tokenizer, limit=3, progress=False)
    assert result.split == "test" and tuple(result.metrics) == TASKS["mlm"].metrics
    assert result.settings["mask_prob"] == 0.15 and result.settings["seed"] == 0


def test_fidelity_with_a_reference(tiny_bert, tokenizer) -> None:
    result = run_task(
        "fidelity", tiny_bert, tokenizer, reference=tiny_bert, sentences=8, progress=False
    )
    assert result.split == "dev" and tuple(result.metrics) == TASKS["fidelity"].metrics
    assert result.metrics["cosine"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "windows,problem",
    [
        (0, "greater than or equal to 1"),
        (-3, "greater than or equal to 1"),
        (1.5, "a valid integer"),
        (2.0, "a valid integer"),
        ("2", "a valid integer"),
        (True, "a valid integer"),
    ],
)
def test_counts_must_be_whole_numbers_of_at_least_one(
    tiny_llama, tokenizer, windows, problem
) -> None:
    with pytest.raises(AecompressError) as refused:
        run_task("wikitext2", tiny_llama, tokenizer, windows=windows, seq_len=16)
    assert str(refused.value) == f"task 'wikitext2': windows: Input should be {problem}"


@pytest.mark.parametrize(
    "task,options,problem",
    [
        ("wikitext2", {"full": "false"}, "full: Input should be a valid boolean"),
        ("wikitext2", {"split": ["test"]}, "split: Input should be a valid string"),
        ("glue-rte", {"lr": True}, "lr: Input should be a valid number"),
        ("glue-rte", {"lr": "inf"}, "lr: Input should be a finite number"),
        ("glue-rte", {"train_fraction": 0}, "train_fraction: Input should be greater than 0"),
        ("glue-rte", {"seed": 10**23}, "seed: Input should be less than"),
        ("stsb", {"pooling": "sum"}, "pooling: Input should be 'mean', 'cls' or 'max'"),
        ("glue-rte-probe", {"pairs": "both"}, "pairs: Input should be 'joint' or 'separate'"),
    ],
)
def test_option_values_are_validated_not_converted(task, options, problem) -> None:
    """A string is not a bool (issue 22 item 9: "false" ran every window), a bool not a
    number, a list not a split."""
    with pytest.raises(AecompressError, match=f"^task '{task}': {problem}"):
        task_settings(task, options)


def test_options_are_validated_and_recorded_as_their_types() -> None:
    assert task_settings("wikitext2", {"full": True, "windows": None})["full"] is True
    settings = task_settings("glue-rte", {"lr": "2e-5", "train_fraction": 1})
    assert settings["lr"] == 2e-5 and settings["train_fraction"] == 1.0  # YAML 1.1's 2e-5 text


def test_a_task_is_registered_once_and_must_say_what_it_needs() -> None:
    with pytest.raises(AecompressError, match="'wikitext2' is registered twice"):
        register(Wikitext2("wikitext2", ("perplexity",), {"test": ("x",)}))
    assert isinstance(TASKS["wikitext2"], Task)
    with pytest.raises(AecompressError, match="needs a kind, metrics and data files"):
        register(Wikitext2("wikitext2-none", (), {"test": ("x",)}))
    assert "wikitext2-none" not in TASKS


def test_task_table_lists_every_task_with_metrics_and_splits() -> None:
    lines = [line for line in task_table().splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(TASKS)
    assert (
        task_table().endswith("\n\n" + PROBE_NOTE) and "not the paper's fine-tuning" in PROBE_NOTE
    )
    row = next(line for line in lines if line.startswith("| arc-easy "))
    assert [c.strip() for c in row.split("|")[1:-1]] == [
        "arc-easy",
        "causal-lm",
        "acc, acc_norm",
        "test (validation)",
    ]


def test_options_table_lists_each_tasks_options_with_defaults() -> None:
    rows = options_table().splitlines()[2:]
    listed = [name for row in rows for name in row.split(" | ")[0].removeprefix("| ").split(", ")]
    assert sorted(listed) == sorted(TASKS)
    assert "| arc-easy, piqa, hellaswag | split (null), limit (null), batch_size (16) |" in rows


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["false", "true", "2", "2e-5", "test", "dev", "mean", ""]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@given(name=st.sampled_from(sorted(TASKS)), data=st.data())
@settings(max_examples=300, deadline=None)
def test_any_options_give_checked_settings_or_one_line(name, data) -> None:
    """Whatever a recipe or -O gives, the settings are of the declared types (a boolean
    only from a boolean), valid again as they are, or the error is one line."""
    task = TASKS[name]
    keys = st.sampled_from([*task.Options.model_fields, "colour"])
    options = data.draw(st.dictionaries(keys, VALUES, max_size=3))
    try:
        found = task_settings(name, options)
    except AecompressError as error:
        assert "\n" not in str(error)
        return
    assert task.settings(found) == found
    for key, default in task.defaults().items():
        if isinstance(default, bool):
            assert found[key] is options.get(key, default)
        elif isinstance(default, int | float) and found[key] is not None:
            assert type(found[key]) is type(default) and math.isfinite(found[key])
