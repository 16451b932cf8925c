import json

import pytest

from tests.benchmarks.conftest import run_script


@pytest.mark.usefixtures("children_in_this_process")
def test_quick_run_measures_dense_runtime_and_decoded_models(llama_folder, tmp_path):
    args = ["--quick", "--threads", "1", "--ratios", "2", "--methods", "svd"]
    run_script("speed", *args, "--model", llama_folder, "--out", str(tmp_path))
    records = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert [(r["method"], r["runtime"]) for r in records] == [
        ("dense", "dense"),
        ("svd", "runtime"),
        ("svd", "decoded"),
        ("dense", "dense"),
    ]
    assert not [r for r in records if "error" in r]
    assert records[1]["module_classes"] == ["LowRankLinear"]
    assert records[1]["modules_bytes"] < records[0]["modules_bytes"]  # factors: fewer bytes
    assert "--quick: a smoke test" in (tmp_path / "speed.md").read_text()


@pytest.mark.usefixtures("children_in_this_process")
def test_a_structured_method_is_also_timed_as_its_exported_plain_model(llama_folder, tmp_path):
    args = ["--quick", "--threads", "1", "--ratios", "1.5", "--methods", "ffn-neurons"]
    run_script("speed", *args, "--model", llama_folder, "--out", str(tmp_path))
    records = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert [(r["method"], r["runtime"]) for r in records] == [
        ("dense", "dense"),
        ("ffn-neurons", "runtime"),
        ("ffn-neurons", "decoded"),
        ("ffn-neurons", "exported"),
        ("dense", "dense"),
    ]
    assert not [r for r in records if "error" in r]
    exported = records[3]
    assert exported["paths"] == records[0]["paths"] == records[1]["paths"]  # up, gate, down
    assert exported["modules_bytes"] < records[0]["modules_bytes"]  # smaller matrices
