import json

import pytest

from tests.benchmarks.conftest import run_script


@pytest.mark.usefixtures("children_in_this_process")
def test_quick_run_measures_dense_runtime_and_decoded_models(llama_folder, tmp_path, monkeypatch):
    import common

    monkeypatch.setattr(common, "busy_cores", lambda: 0.0)  # an idle machine
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
    mlp = "up,gate,down"
    assert records[1]["modules"][mlp]["module_classes"] == ["LowRankLinear"]
    dense_bytes = records[0]["modules"][mlp]["modules_bytes"]
    assert records[1]["modules"][mlp]["modules_bytes"] < dense_bytes  # factors: fewer bytes
    report = (tmp_path / "speed.md").read_text()
    assert "--quick: a smoke test" in report
    assert "the machine was not idle" not in report


@pytest.mark.parametrize(
    ("method", "matrices"),
    [
        ("ffn-neurons", "up,gate,down"),
        ("attn-dims", "q,k,v,o"),
        ("slicegpt", "q,k,v,o,up,gate,down"),
    ],
)
@pytest.mark.usefixtures("children_in_this_process")
def test_a_structured_method_is_also_timed_as_its_exported_plain_model(
    llama_folder, tmp_path, method, matrices
):
    args = ["--quick", "--threads", "1", "--ratios", "1.5", "--methods", method]
    run_script("speed", *args, "--model", llama_folder, "--out", str(tmp_path))
    records = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert [(r["method"], r["runtime"]) for r in records] == [
        ("dense", "dense"),
        (method, "runtime"),
        (method, "decoded"),
        (method, "exported"),
        ("dense", "dense"),
    ]
    assert not [r for r in records if "error" in r]
    assert records[2]["same_as"] == "runtime"  # smaller nn.Linear modules: nothing to decode
    dense, runtime, exported = (records[i]["modules"][matrices] for i in (0, 1, 3))
    assert exported["paths"] == dense["paths"] == runtime["paths"]  # the same matrices
    assert exported["modules_bytes"] < dense["modules_bytes"]  # smaller matrices
    report = (tmp_path / "speed.md").read_text()
    assert f"Compressed modules alone (the {matrices} matrices" in report


@pytest.mark.usefixtures("children_in_this_process")
def test_rounds_measure_every_configuration_again_after_the_dense_model(
    llama_folder, tmp_path, monkeypatch
):
    import common

    monkeypatch.setattr(common, "busy_cores", lambda: 1.0)  # others hold a core throughout
    args = ["--quick", "--rounds", "2", "--threads", "1", "--ratios", "2", "--methods", "svd"]
    run_script("speed", *args, "--model", llama_folder, "--out", str(tmp_path))
    records = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert [(r["method"], r["runtime"], r["round"]) for r in records] == [
        ("dense", "dense", 1),
        ("svd", "runtime", 1),
        ("svd", "decoded", 1),
        ("dense", "dense", 2),
        ("svd", "runtime", 2),
        ("svd", "decoded", 2),
        ("dense", "dense", 2),
    ]
    assert not [r for r in records if "error" in r]
    report = (tmp_path / "speed.md").read_text()
    assert report.count("| svd | runtime (LowRankLinear) |") == 2  # once per table, not per round
    assert "median over 2 rounds" in report
    assert "svd at ratio 2, runtime (LowRankLinear): prefill 1x512" in report  # its spread
    assert "**the machine was not idle** (other processes kept 1.0 of" in report


def test_pooled_takes_the_median_over_rounds_of_each_configuration():
    from speed import pooled  # benchmarks/ is on the path (tests/benchmarks/conftest.py)

    def measured(round_: int, prefill: float) -> dict:
        times = {"prefill_1x512": {"median": prefill}}
        modules = {"up": {"modules_512": {"median": prefill / 10}, "modules_1": {"median": 1.0}}}
        return {"method": "svd", "ratio": 2, "runtime": "runtime", "round": round_} | {
            "figures": times,
            "modules": modules,
        }

    dense = {"method": "dense", "runtime": "dense", "round": 1}
    rows = pooled([dense, measured(1, 30.0), measured(2, 10.0), measured(3, 20.0), dense])
    assert [r["method"] for r in rows] == ["dense", "svd", "dense"]
    assert rows[1]["figures"]["prefill_1x512"]["median"] == 20.0
    assert rows[1]["modules"]["up"]["modules_512"]["median"] == 2.0
    assert [r["round"] for r in rows[1]["rounds"]] == [1, 2, 3]
