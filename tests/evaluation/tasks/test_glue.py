import pytest

from aecompress.errors import AecompressError
from aecompress.evaluation.glue import GLUE_TASKS
from aecompress.evaluation.tasks import TASKS, run_task
from aecompress.evaluation.tasks.glue import probe_tasks


def test_every_glue_task_has_a_probe_with_its_metrics_and_files() -> None:
    for name in GLUE_TASKS:
        tuned, probed = TASKS[f"glue-{name}"], TASKS[f"glue-{name}-probe"]
        assert (probed.metrics, probed.files["dev"], probed.needs) == (
            tuned.metrics,
            tuned.files["dev"],
            tuned.needs,
        )
        assert tuned.files["heldout"] == tuned.files["dev"][:1]  # train only
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
    with pytest.raises(AecompressError, match="max_train: Input should be a valid integer"):
        run_task("glue-rte-probe", tiny_bert, tokenizer, max_train=0.5)
    with pytest.raises(AecompressError, match="folds: Input should be greater than or equal to 2"):
        run_task("glue-rte-probe", tiny_bert, tokenizer, folds=1)
    with pytest.raises(AecompressError, match="has no option epochs"):
        run_task("glue-rte-probe", tiny_bert, tokenizer, epochs=1)


def test_a_probe_is_recorded_as_a_probe(tiny_bert, tokenizer) -> None:
    result = run_task("glue-rte-probe", tiny_bert, tokenizer, max_train=20, progress=False)
    assert result.task == "glue-rte-probe" and result.split == "dev"
    assert result.settings["max_train"] == 20 and result.settings["pooling"] == "mean"
    assert set(result.data_sha256) == {"glue/RTE/train.tsv", "glue/RTE/dev.tsv"}


def test_a_heldout_run_records_its_split_and_reads_only_train(tiny_bert, tokenizer) -> None:
    options = {"epochs": 1, "batch_size": 8, "train_fraction": 0.02, "progress": False}
    result = run_task("glue-rte", tiny_bert, tokenizer, split="heldout", heldout=0.02, **options)
    assert result.split == "heldout" and result.settings["heldout_seed"] == 0
    assert set(result.data_sha256) == {"glue/RTE/train.tsv"}
