import json

from llmcompressor_reference import CONFIGS, cell_of, recorded, tasks_of

from aecompress.evaluation.tasks import task_settings
from aecompress.sweep import SweepRecipe

MLPS, LINEAR = "up,gate,down", "q,k,v,o,up,gate,down"


def frontier() -> SweepRecipe:
    """Two perplexity tasks for every cell, and ARC-Easy for llm-compressor's int3 on MLPs."""
    windows = {"windows": 16, "seq_len": 512}
    return SweepRecipe.model_validate(
        {
            "name": "f",
            "models": ["m"],
            "methods": [{"method": "gptq", "label": "llm-compressor gptq g64"}],
            "ratios": [4.92, 7.1],
            "targets": [MLPS, LINEAR],
            "tasks": [
                {"task": "wikitext2", "options": windows | {"split": "validation"}},
                {"task": "wikitext2", "options": windows},
                {"task": "arc-easy", "ratios": [4.92], "targets": [MLPS]},
            ],
        }
    )


def test_a_configuration_runs_the_tasks_of_its_ratio_label_and_targets():
    w3, w2 = "llm-compressor gptq g64 w3", "llm-compressor gptq g64 w2"
    tasks = {
        (name, targets): [t.task for t in tasks_of(frontier(), cell_of(name, "m", targets))]
        for name in (w3, w2)
        for targets in (MLPS, LINEAR)
    }
    assert tasks[(w3, MLPS)] == ["wikitext2", "wikitext2", "arc-easy"]
    assert tasks[(w3, LINEAR)] == tasks[(w2, MLPS)] == ["wikitext2", "wikitext2"]
    assert CONFIGS[w3][3] == 4.92


def test_a_configuration_is_recorded_once_each_of_its_tasks_is_with_its_settings(tmp_path):
    results, sweep = tmp_path / "results.jsonl", frontier()
    cell = cell_of("llm-compressor gptq g64 w2", "m", MLPS)
    records = [
        {"cell": cell, "task": t.task, "status": "ok", "metrics": {"perplexity": 1.0}}
        | {"settings": task_settings(t.task, t.options)}
        for t in tasks_of(sweep, cell)
    ]
    results.write_text(json.dumps(records[0]) + "\n")
    assert not recorded(results, cell, sweep)
    other = records[1] | {"settings": records[1]["settings"] | {"windows": 8}}
    with results.open("a") as handle:
        handle.write(json.dumps(other) + "\n")
    assert not recorded(results, cell, sweep)  # another measurement of the same task
    with results.open("a") as handle:
        handle.write(json.dumps(records[1]) + "\n")
    assert recorded(results, cell, sweep)
