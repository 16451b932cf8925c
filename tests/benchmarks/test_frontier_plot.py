import json

from frontier_plot import curves

from tests.benchmarks.conftest import run_script


def record(
    label: str,
    split: str,
    perplexity: float,
    stored_bits: int,
    targets: str = "down",
    seq_len: int = 512,
) -> dict:
    cell = {"model": "m", "label": label, "targets": targets, "group": "none", "ratio": 1.0}
    return {"cell": cell, "status": "ok", "task": "wikitext2", "split": split} | {
        "settings": {"split": split, "seq_len": seq_len},
        "metrics": {"perplexity": perplexity},
        "stored_bits": stored_bits,
        "target_bits": 1600,
        "target_params": 100,  # in bf16
    }


def test_each_method_is_a_curve_of_perplexity_against_bits_per_weight(tmp_path):
    records = [
        record("dense", "test", 10.0, 1600),
        record("gptq", "test", 30.0, 325),
        record("gptq", "test", 12.0, 425),
        record("gptq", "validation", 9.0, 425),
        record("sparsegpt", "test", 20.0, 325),
    ]
    methods, dense = curves(records, "wikitext2", "test")
    assert dense == 10.0
    assert methods == {"gptq": [(3.25, 30.0), (4.25, 12.0)], "sparsegpt": [(3.25, 20.0)]}
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_script("frontier_plot", str(results), "--splits", "test")
    assert (tmp_path / "wikitext2_test_perplexity_vs_bits.png").read_bytes()[:4] == b"\x89PNG"


def test_targets_keeps_their_cells_and_the_dense_line(tmp_path):
    records = [
        record("dense", "test", 10.0, 1600, targets=""),
        record("gptq", "test", 12.0, 425, targets="up,down"),
        record("gptq", "test", 14.0, 425, targets="q,up,down"),
    ]
    methods, dense = curves(records, "wikitext2", "test", targets="q,up,down")
    assert dense == 10.0
    assert methods == {"gptq": [(4.25, 14.0)]}
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_script("frontier_plot", str(results), "--splits", "test", "--targets", "q,up,down")
    png = tmp_path / "wikitext2_test_q+up+down_perplexity_vs_bits.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_curves_are_the_grids_settings_not_a_best_rows_longer_windows():
    records = [
        record("dense", "test", 10.0, 1600),
        record("gptq", "test", 12.0, 425),
        record("sparsegpt", "test", 20.0, 325),
        record("dense", "test", 8.0, 1600, seq_len=2048),
        record("gptq", "test", 9.0, 425, seq_len=2048),
    ]
    methods, dense = curves(records, "wikitext2", "test")
    assert dense == 10.0
    assert methods == {"gptq": [(4.25, 12.0)], "sparsegpt": [(3.25, 20.0)]}


def test_without_targets_the_curves_are_those_of_most_cells():
    records = [
        record("dense", "test", 10.0, 1600, targets=""),
        record("gptq", "test", 12.0, 425, targets="up,down"),
        record("gptq", "test", 30.0, 325, targets="up,down"),
        record("gptq", "test", 14.0, 425, targets="q,up,down"),
    ]
    methods, dense = curves(records, "wikitext2", "test")
    assert dense == 10.0 and methods == {"gptq": [(3.25, 30.0), (4.25, 12.0)]}


def test_a_record_without_target_params_counts_its_target_bits_in_bf16():
    older = record("llm-compressor gptq", "test", 13.0, 425)
    del older["target_params"]
    methods, _ = curves([older], "wikitext2", "test")
    assert methods == {"llm-compressor gptq": [(4.25, 13.0)]}


def test_a_split_without_compressed_cells_has_no_curves():
    assert curves([], "wikitext2", "test") == ({}, None)
    assert curves([record("dense", "test", 10.0, 1600)], "wikitext2", "test") == ({}, 10.0)
