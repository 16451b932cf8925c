import inspect

import pytest

from aecompress.errors import AecompressError
from aecompress.evaluation.catalog import GLUE_TASKS, PROBE_NOTE, TASK_NEEDS, task_table
from aecompress.evaluation.kinds import model_kinds
from aecompress.evaluation.results import TaskResult
from aecompress.evaluation.tasks import TASKS, check_task, probe_tasks, run_task

WIKITEXT2_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


def test_registry_is_consistent() -> None:
    assert set(TASKS) == set(TASK_NEEDS)
    for task in TASKS.values():
        split = inspect.signature(task.run).parameters.get("split")
        if split is not None and split.default is not None:
            assert split.default == task.split, task.name


def test_model_kinds(tiny_bert, tiny_bert_mlm, tiny_llama, tiny_gpt2) -> None:
    assert model_kinds(tiny_bert) == {"encoder"}
    assert model_kinds(tiny_bert_mlm) == {"encoder", "masked-lm"}
    assert model_kinds(tiny_llama) == model_kinds(tiny_gpt2) == {"causal-lm"}
    assert model_kinds(tiny_gpt2.transformer) == frozenset()


def test_unknown_task_lists_the_known_ones(tiny_llama) -> None:
    with pytest.raises(AecompressError, match=r"unknown task 'wikitext3': known tasks are .*piqa"):
        check_task("wikitext3", tiny_llama)


def test_task_that_does_not_fit_the_model(tiny_bert) -> None:
    with pytest.raises(AecompressError) as error:
        check_task("arc-easy", tiny_bert)
    assert str(error.value) == (
        "task 'arc-easy' needs a causal LM; this model (BertModel) can run: stsb, fidelity, "
        "glue-mrpc, glue-rte, glue-stsb, glue-sst2, glue-cola, glue-mrpc-probe, glue-rte-probe, "
        "glue-stsb-probe, glue-sst2-probe, glue-cola-probe"
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


@pytest.mark.parametrize("windows", [0, -3, 1.5, "2", True])
def test_counts_must_be_whole_numbers_of_at_least_one(tiny_llama, tokenizer, windows) -> None:
    with pytest.raises(AecompressError) as refused:
        run_task("wikitext2", tiny_llama, tokenizer, windows=windows, seq_len=16)
    assert str(refused.value) == (
        f"task 'wikitext2': windows must be a whole number >= 1 (got {windows!r})"
    )


def test_task_table_lists_every_task_with_metrics_and_splits() -> None:
    lines = [line for line in task_table().splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(TASKS)
    assert task_table().endswith(PROBE_NOTE) and "not the paper's fine-tuning" in PROBE_NOTE
    row = next(line for line in lines if line.startswith("| arc-easy "))
    assert [c.strip() for c in row.split("|")[1:-1]] == [
        "arc-easy",
        "causal-lm",
        "acc, acc_norm",
        "test (validation)",
    ]


def test_every_glue_task_has_a_probe_with_its_metrics_and_files() -> None:
    for name in GLUE_TASKS:
        tuned, probed = TASKS[f"glue-{name}"], TASKS[f"glue-{name}-probe"]
        assert (probed.metrics, probed.files, probed.needs) == (
            tuned.metrics,
            tuned.files,
            tuned.needs,
        )
        assert {"max_train", "l2", "folds", "pooling", "pairs"} <= set(probed.defaults())
        assert "epochs" not in probed.defaults()


def test_probe_tasks_replaces_the_glue_tasks_only() -> None:
    assert probe_tasks(["stsb", "glue-rte", "glue-cola-probe"]) == [
        "stsb",
        "glue-rte-probe",
        "glue-cola-probe",
    ]
    with pytest.raises(AecompressError, match=r"--probe applies to the glue-\* tasks \(got stsb\)"):
        probe_tasks(["stsb"])


def test_probe_counts_are_checked(tiny_bert, tokenizer) -> None:
    with pytest.raises(AecompressError, match="max_train must be a whole number >= 1"):
        run_task("glue-rte-probe", tiny_bert, tokenizer, max_train=0.5)
    with pytest.raises(AecompressError, match="has no option epochs"):
        run_task("glue-rte-probe", tiny_bert, tokenizer, epochs=1)


def test_a_probe_is_recorded_as_a_probe(tiny_bert, tokenizer) -> None:
    result = run_task("glue-rte-probe", tiny_bert, tokenizer, max_train=20, progress=False)
    assert result.task == "glue-rte-probe" and result.split == "dev"
    assert result.settings["max_train"] == 20 and result.settings["pooling"] == "mean"
    assert set(result.data_sha256) == {"glue/RTE/train.tsv", "glue/RTE/dev.tsv"}
