from tests.benchmarks.conftest import run_script


def test_quick_run_writes_every_row_of_the_embedding_table(encoder_folder, tmp_path):
    out = tmp_path / "ae.md"
    run_script(
        "ae_minilm", "--quick", "--model", encoder_folder, "--ratios", "2", "--out", str(out)
    )
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 2 |")]
    methods = [row.split(" | ")[1] for row in rows]
    assert methods == ["svd", "svd, rows x sqrt(count+1)", "ae linear", "ae (default)"]
    assert "Dense: **" in text and "--quick: a smoke test" in text
    assert "Attention keys" not in text  # part 2 is not quick
