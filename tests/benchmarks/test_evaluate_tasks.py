import json

from tests.benchmarks.conftest import run_script


def test_quick_run_prints_one_result_per_task_on_one_short_window(llama_folder, capsys):
    run_script("evaluate_tasks", llama_folder, "wikitext2", "wikitext2:split=validation", "--quick")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    assert [r["split"] for r in lines] == ["test", "validation"]
    assert all(r["settings"]["windows"] == 1 and r["settings"]["seq_len"] == 32 for r in lines)
