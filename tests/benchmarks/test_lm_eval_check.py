from tests.benchmarks.conftest import run_script


def test_quick_run_compares_the_first_items_with_lm_eval(llama_folder, tmp_path):
    out = tmp_path / "check.md"
    run_script("lm_eval_check", llama_folder, "--quick", "--out", str(out))
    text = out.read_text()
    assert "the first 4 items of `arc-easy`" in text
    assert "Same prompts and continuations: True" in text
