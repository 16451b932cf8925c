import importlib.util

import compensation
import pytest
import torch

from aecompress.report import write_report
from aecompress.sweep import read_results
from tests.benchmarks.conftest import run_script


def magnitude_prune(loaded, modifier, paths, sparsity, windows):
    """Stands in for llm-compressor (not installed here): each matrix's smallest weights."""
    assert modifier == "SparseGPTModifier" and windows.shape == (4, 32)
    with torch.no_grad():
        for path in paths:
            weight = loaded.model.get_submodule(path).weight
            dropped = int(sparsity * weight.numel())
            threshold = weight.abs().flatten().kthvalue(dropped).values
            weight[weight.abs() <= threshold] = 0


def test_quick_run_appends_sweep_records_once_and_the_report_tables_them(llama_folder, tmp_path):
    results = tmp_path / "results.jsonl"
    args = ["--quick", "--model", llama_folder, "--results", str(results)]
    compensation.run(compensation.parse_args(args), prune=magnitude_prune)
    records = read_results(results)
    assert [(r["cell"]["label"], r["split"], r["status"]) for r in records] == [
        ("llmcompressor:sparsegpt", "validation", "ok"),
        ("llmcompressor:sparsegpt", "test", "ok"),
    ]
    assert abs(records[0]["ratio"] - 1.25) < 0.01  # kept values and positions fill the budget
    compensation.run(compensation.parse_args(args), prune=magnitude_prune)
    assert len(read_results(results)) == 2  # resumed: nothing ran again
    write_report([results], records)
    assert "llmcompressor:sparsegpt" in (tmp_path / "report.md").read_text()


@pytest.mark.skipif(bool(importlib.util.find_spec("llmcompressor")), reason="installed here")
def test_without_llmcompressor_the_script_stops_before_any_work(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit) as stop:
        run_script("compensation", "--quick", "--results", str(results))
    assert stop.value.code == 2 and not results.exists()
    assert "error: llmcompressor is not installed" in capsys.readouterr().err
