import json

from tests.benchmarks.conftest import run_script


def test_each_rate_is_scored_on_held_out_train_data_and_the_best_chosen(encoder_folder, tmp_path):
    results = tmp_path / "selection.jsonl"
    args = ["--model", encoder_folder, "--results", str(results), "--tasks", "glue-rte"]
    quick = ["--rates", "1e-5", "1e-3", "--train-fraction", "0.01"]
    run_script("glue_select", *args, *quick)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["split"], r["settings"]["lr"]) for r in records] == [
        ("heldout", 1e-5),
        ("heldout", 1e-3),
    ]
    assert all(set(r["data_sha256"]) == {"glue/RTE/train.tsv"} for r in records)  # no dev
    best = max(records, key=lambda r: r["metrics"]["accuracy"])["settings"]["lr"]
    table = (tmp_path / "selection.md").read_text()
    chosen = [line for line in table.splitlines() if line.endswith("**chosen** |")]
    assert len(chosen) == 1 and chosen[0].startswith(f"| glue-rte | {best:g} |")
    run_script("glue_select", *args, *quick)  # done: nothing is run again
    assert len(results.read_text().splitlines()) == 2
