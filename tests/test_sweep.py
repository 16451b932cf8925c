import json
from pathlib import Path

import pytest

from aecompress.calibration import CalibrationConfig
from aecompress.errors import AecompressError
from aecompress.report import write_report
from aecompress.sweep import (
    MethodSpec,
    SweepRecipe,
    TaskSpec,
    current,
    parse_shard,
    read_results,
    run_sweep,
)


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    from tests.conftest import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def recipe(model: str) -> SweepRecipe:
    return SweepRecipe.model_validate(
        {
            "name": "two-cells",
            "models": [model],
            "methods": [{"method": "svd"}],
            "ratios": [2, 4],
            "targets": ["k,down"],
            "tasks": [{"task": "wikitext2", "options": {"windows": 1, "seq_len": 16}}],
        }
    )


def test_interrupted_sweep_resumes_without_recomputing(tiny_folder, tmp_path, monkeypatch):
    results = tmp_path / "out" / "results.jsonl"
    import aecompress.sweep as sweep_module

    real_compress, calls = sweep_module.compress, []

    def counting(model, plan, **kwargs):
        calls.append(plan.ratio)
        if plan.ratio == 4 and len(calls) == 2:
            raise KeyboardInterrupt  # the sweep is interrupted during the second cell
        return real_compress(model, plan, **kwargs)

    monkeypatch.setattr(sweep_module, "compress", counting)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(recipe(tiny_folder), results, progress=False)
    assert [r["cell"]["label"] for r in read_results(results)] == ["dense", "svd"]
    records = run_sweep(recipe(tiny_folder), results, progress=False)
    assert calls == [2, 4, 4]  # the finished cell was not recomputed
    assert [(r["cell"]["label"], r["cell"]["ratio"]) for r in records] == [
        ("dense", 1.0),
        ("svd", 2),
        ("svd", 4),
    ]
    assert all(r["status"] == "ok" for r in records)


def test_each_record_names_the_environment_it_was_measured_in(tiny_folder, tmp_path):
    from aecompress.provenance import environment

    records = run_sweep(recipe(tiny_folder), tmp_path / "results.jsonl", progress=False)
    assert [r["environment"] for r in records] == [environment()] * len(records)


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tiny_folder, tmp_path):
    plan = recipe(tiny_folder).model_copy(update={"ratios": [1e9, 2]})
    records = run_sweep(plan, tmp_path / "results.jsonl", progress=False)
    statuses = [(r["cell"]["ratio"], r["status"]) for r in records]
    assert statuses == [(1.0, "ok"), (1e9, "failed"), (2, "ok")]
    assert "ratio is too large" in records[1]["error"]


def test_report_renders_tables_and_plots(tmp_path):
    results = tmp_path / "results.jsonl"
    cell = {
        "model": "m",
        "targets": "k",
        "group": "none",
        "seed": 0,
        "method": "svd",
        "options": {},
    }
    records = [
        {
            "cell": {"model": "m", "label": "dense", "ratio": 1.0},
            "status": "ok",
            "task": "stsb",
            "split": "test",
            "metrics": {"spearman": 82.0},
        },
        {
            "cell": {**cell, "label": "svd", "ratio": 3},
            "status": "ok",
            "task": "stsb",
            "split": "test",
            "metrics": {"spearman": 75.0},
        },
        {
            "cell": {**cell, "label": "svd", "ratio": 10},
            "status": "ok",
            "task": "stsb",
            "split": "test",
            "metrics": {"spearman": 61.5},
        },
        {
            "cell": {**cell, "label": "ae", "ratio": 10},
            "status": "failed",
            "task": "stsb",
            "error": "boom",
        },
        {  # failed once, then succeeded when the sweep was re-run: not a failure
            "cell": {**cell, "label": "prune", "ratio": 3},
            "status": "failed",
            "task": "stsb",
            "error": "interrupted",
        },
        {
            "cell": {**cell, "label": "prune", "ratio": 3},
            "status": "ok",
            "task": "stsb",
            "split": "test",
            "metrics": {"spearman": 80.0},
        },
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    written = write_report([results], read_results(results))
    report = (tmp_path / "report.md").read_text()
    assert "dense: 82" in report
    assert "| svd | 75 (-7) | 61.5 (-20.5) |" in report
    assert "ae k ratio 10 stsb: boom" in report and "interrupted" not in report
    assert report.index("| svd |") < report.index("| prune | 80 (-2) |  |")  # recipe order
    assert (tmp_path / "results.csv").read_text().count("\n") == 5
    png = [p for p in written if p.suffix == ".png"]
    assert len(png) == 1 and png[0].read_bytes()[:4] == b"\x89PNG"


def test_a_report_replaces_only_its_own_files(tmp_path):
    record = {"cell": {"model": "m", "label": "svd", "targets": "k", "ratio": 2}, "task": "stsb"}
    record |= {"status": "ok", "split": "test", "metrics": {"spearman": 75.0}}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(record) + "\n")
    written = write_report([results], read_results(results))
    assert [p.name for p in written] == ["report.md", "results.csv", "m_k_stsb_spearman.png"]
    write_report([results], read_results(results))  # a report replaces its own files
    for path in written:
        saved = path.read_bytes()
        path.write_text("mine")
        with pytest.raises(AecompressError, match=f"report file {path} exists and is not"):
            write_report([results], read_results(results))
        assert path.read_text() == "mine"
        path.write_bytes(saved)


def test_unknown_recipe_key_is_named(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "name: g\nmodels: [m]\nmethods: [{method: svd}]\nratios: [2]\ntargets: [k]\n"
        "tasks: [{task: wikitext2}]\nratio: 3\n"
    )
    with pytest.raises(AecompressError, match="ratio: Extra inputs are not permitted"):
        SweepRecipe.from_yaml(path)


def test_a_method_can_be_limited_to_some_targets(tmp_path):
    from aecompress.sweep import cells

    grid = {
        "name": "g",
        "models": ["m"],
        "methods": [{"method": "svd"}, {"method": "sparsegpt", "targets": ["k"]}],
        "ratios": [2],
        "targets": ["embed", "k"],
        "tasks": [{"task": "stsb"}],
    }
    found = [(c["targets"], c["label"]) for c in cells(SweepRecipe.model_validate(grid))]
    assert found == [("embed", "svd"), ("k", "svd"), ("k", "sparsegpt")]
    grid["methods"][1]["targets"] = ["down"]
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))
    with pytest.raises(AecompressError, match=r"sparsegpt: targets \['down'\] are not among"):
        SweepRecipe.from_yaml(path)


def test_a_method_can_be_limited_to_some_ratios_and_carry_its_calibration(tmp_path):
    from aecompress.sweep import cell_recipe, cells

    grid = {
        "name": "g",
        "models": ["m"],
        "methods": [
            {"method": "svd"},
            {"method": "svdllm", "ratios": [2], "recipe": {"calibration": {"samples": 4}}},
        ],
        "ratios": [2, 4],
        "targets": ["k"],
        "calibration": {"samples": 8},
        "tasks": [{"task": "stsb"}],
    }
    plan = SweepRecipe.model_validate(grid)
    found = [(c["ratio"], c["label"]) for c in cells(plan)]
    assert found == [(2, "svd"), (2, "svdllm"), (4, "svd")]
    samples = [cell_recipe(plan, c).calibration.samples for c in cells(plan)]
    assert samples == [8, 4, 8]  # a method's calibration replaces the sweep's
    grid["methods"][1]["ratios"] = [3]
    with pytest.raises(ValueError, match=r"svdllm: ratios \[3.0\] are not among"):
        SweepRecipe.model_validate(grid)


def svd_and_prune(tasks: list[dict], targets: tuple[str, ...] = ("k",)) -> SweepRecipe:
    """A one-ratio grid of svd and prune on `targets` with these tasks."""
    return SweepRecipe.model_validate(
        {
            "name": "g",
            "models": ["m"],
            "methods": [{"method": "svd"}, {"method": "prune"}],
            "ratios": [2],
            "targets": list(targets),
            "tasks": tasks,
        }
    )


def planned_jobs(grid: SweepRecipe, results: Path) -> list:
    """The jobs the sweep would run (nothing is run)."""
    jobs = []
    run_sweep(grid, results, executor=lambda _, found, __: jobs.extend(found))
    return jobs


def planned_tasks(grid: SweepRecipe, results: Path) -> dict[str, list]:
    """Each cell's label -> the task specs the sweep would run for it (nothing is run)."""
    return {job.cell["label"]: job.tasks for job in planned_jobs(grid, results)}


def test_a_task_can_be_limited_to_some_methods_and_the_dense_model_runs_it(tmp_path):
    grid = svd_and_prune([{"task": "wikitext2"}, {"task": "arc-easy", "labels": ["prune"]}])
    planned = planned_tasks(grid, tmp_path / "results.jsonl")
    tasks = {label: [t.task for t in specs] for label, specs in planned.items()}
    assert tasks == {
        "dense": ["wikitext2", "arc-easy"],
        "svd": ["wikitext2"],
        "prune": ["wikitext2", "arc-easy"],
    }
    with pytest.raises(ValueError, match=r"task piqa: labels \['svdd'\] name no method"):
        SweepRecipe.model_validate(
            {**grid.model_dump(), "tasks": [{"task": "piqa", "labels": ["svdd"]}]}
        )


def test_a_task_can_be_limited_to_some_targets(tmp_path):
    tasks = [{"task": "wikitext2"}, {"task": "arc-easy", "labels": ["svd"], "targets": ["q,k"]}]
    grid = svd_and_prune(tasks, targets=("k", "q,k"))
    jobs = planned_jobs(grid, tmp_path / "results.jsonl")
    planned = {(j.cell["label"], j.cell.get("targets")): [t.task for t in j.tasks] for j in jobs}
    assert planned == {
        ("dense", None): ["wikitext2", "arc-easy"],
        ("svd", "k"): ["wikitext2"],
        ("prune", "k"): ["wikitext2"],
        ("svd", "q,k"): ["wikitext2", "arc-easy"],
        ("prune", "q,k"): ["wikitext2"],
    }
    with pytest.raises(ValueError, match=r"task piqa: targets \['v'\] are not among the sweep"):
        SweepRecipe.model_validate(
            {**grid.model_dump(), "tasks": [{"task": "piqa", "targets": ["v"]}]}
        )


def test_a_task_listed_for_several_cells_runs_once_for_a_cell_it_names_twice(tmp_path):
    grid = svd_and_prune(
        [
            {"task": "wikitext2", "options": {"seq_len": 64}, "labels": ["svd"]},
            {"task": "wikitext2", "options": {"seq_len": 64}, "labels": ["prune"]},
            {"task": "wikitext2", "options": {"seq_len": 32}, "labels": ["prune"]},
        ]
    )
    planned = planned_tasks(grid, tmp_path / "results.jsonl")
    tasks = {label: [t.options["seq_len"] for t in specs] for label, specs in planned.items()}
    assert tasks == {"dense": [64, 32], "svd": [64], "prune": [64, 32]}


@pytest.mark.parametrize(
    ("variants", "titles"),
    [
        ([{"split": "validation"}, {"split": "test"}], ["(validation)", "(test)"]),
        ([{"seq_len": 16}, {"seq_len": 8}], ["(test; seq_len 16)", "(test; seq_len 8)"]),
    ],
    ids=["splits", "settings"],
)
def test_a_task_run_twice_with_other_settings_keeps_both(
    variants, titles, tiny_folder, tmp_path, monkeypatch
):
    results = tmp_path / "results.jsonl"
    tasks = [
        TaskSpec(task="wikitext2", options={"windows": 1, "seq_len": 16} | v) for v in variants
    ]
    plan = recipe(tiny_folder).model_copy(update={"ratios": [2], "tasks": tasks})
    run_sweep(plan, results, progress=False)
    calls = counting_compress(monkeypatch)
    records = run_sweep(plan, results, progress=False)
    assert calls == [] and len(records) == 4  # nothing recomputed
    assert len(current(records)) == 4
    write_report([results], records)
    report = (tmp_path / "report.md").read_text()
    assert all(f"perplexity {title}" in report for title in titles)


def test_report_of_a_single_ratio_draws_bars(tmp_path):
    results = tmp_path / "results.jsonl"
    cell = {"model": "m", "targets": "k", "group": "none", "seed": 0, "ratio": 10}
    records = [
        {"cell": {**cell, "label": name}, "status": "ok", "task": task, "split": "test"}
        | {"metrics": {"spearman": value}, "compress_seconds": 60, "seconds": 30}
        for name, task, value in [("svd", "stsb", 61.5), ("svd", "x", 1), ("ae", "stsb", 77.7)]
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    written = write_report([results], read_results(results))
    report = (tmp_path / "report.md").read_text()
    assert "| svd | 61.5 |" in report
    assert "time of the cells: 3.5 min" in report  # each cell's compression counted once
    png = [p for p in written if p.suffix == ".png"]
    assert len(png) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in png)


def test_shards_share_the_grid_and_the_dense_model_is_evaluated_once(tiny_folder, tmp_path):
    results = tmp_path / "results.jsonl"
    plan = recipe(tiny_folder).model_copy(update={"ratios": [2, 3, 4]})
    run_sweep(plan, results, progress=False, shard=parse_shard("1/2"))
    assert [r["cell"]["ratio"] for r in read_results(results)] == [3]
    records = run_sweep(plan, results, progress=False, shard=parse_shard("0/2"))
    assert sorted(r["cell"]["ratio"] for r in records) == [1.0, 2, 3, 4]
    with pytest.raises(AecompressError, match="I/N"):
        parse_shard("2/2")


def counting_compress(monkeypatch) -> list[float]:
    """From now on, the ratio of every cell the sweep compresses is appended to the list."""
    import aecompress.sweep as sweep_module

    real_compress, calls = sweep_module.compress, []

    def counting(model, plan, **kwargs):
        calls.append(plan.ratio)
        return real_compress(model, plan, **kwargs)

    monkeypatch.setattr(sweep_module, "compress", counting)
    return calls


def test_a_torn_last_line_loses_no_record(tiny_folder, tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    run_sweep(recipe(tiny_folder), results, progress=False)
    text = results.read_text()
    results.write_text(text[: text.rindex("\n", 0, -1) + 40])  # the last write was killed
    calls = counting_compress(monkeypatch)
    run_sweep(recipe(tiny_folder), results, progress=False)
    assert calls == [4]  # the torn cell again, on a line of its own
    records = run_sweep(recipe(tiny_folder), results, progress=False)
    assert calls == [4]
    assert [(r["cell"]["ratio"], r["status"]) for r in records] == [
        (1.0, "ok"),
        (2, "ok"),
        (4, "ok"),
    ]


def test_a_record_glued_onto_a_torn_line_is_read(tmp_path):
    record = {
        "cell": {"model": "m", "label": "dense", "ratio": 1.0},
        "task": "t",
        "status": "ok",
        "metrics": {"m": 1.0},
    }
    line = json.dumps(record, sort_keys=True)
    results = tmp_path / "results.jsonl"
    results.write_text(line[:30] + line + "\n" + line[:10])
    assert read_results(results) == [record]


def test_changed_task_options_or_calibration_are_recomputed(tiny_folder, tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    plan = recipe(tiny_folder).model_copy(update={"ratios": [2]})
    first = run_sweep(plan, results, progress=False)
    calls = counting_compress(monkeypatch)
    longer = plan.model_copy(
        update={"tasks": [TaskSpec(task="wikitext2", options={"windows": 2, "seq_len": 16})]}
    )
    records = run_sweep(longer, results, progress=False)
    assert calls == [2] and len(records) == 4  # the dense model and the cell again
    calibrated = longer.model_copy(update={"calibration": CalibrationConfig(samples=2)})
    run_sweep(calibrated, results, progress=False)
    assert calls == [2, 2]
    write_report([results], read_results(results))
    report = (tmp_path / "report.md").read_text()
    one_window = first[1]["metrics"]["perplexity"]
    new = read_results(results)[-1]["metrics"]["perplexity"]
    assert "(test; windows 1)\n\ndense: " in report and f"{one_window:.4g}" in report
    assert "(test; windows 2)\n\ndense: " in report and f"{new:.4g}" in report
    assert len(current(read_results(results))) == 4  # the recalibrated cell replaced its own


def test_a_failure_is_recorded_and_reported_once(tiny_folder, tmp_path):
    results = tmp_path / "results.jsonl"
    plan = recipe(tiny_folder).model_copy(update={"ratios": [1e9]})
    for _ in range(2):
        records = run_sweep(plan, results, progress=False)
    assert [r["status"] for r in records] == ["ok", "failed"]
    write_report([results], records + records)
    assert (tmp_path / "report.md").read_text().count("ratio is too large") == 1


def test_a_method_carries_its_own_recipe_fields(tiny_folder, tmp_path):
    grid = SweepRecipe.model_validate(
        {
            "name": "pipelines",
            "models": [tiny_folder],
            "methods": [
                {"method": "svdllm", "label": "independent", "recipe": {"pipeline": "independent"}},
                {"method": "svdllm", "label": "sequential", "recipe": {"pipeline": "sequential"}},
            ],
            "ratios": [2],
            "targets": ["down"],
            "calibration": {"samples": 4, "seq_len": 16, "batch_size": 2},
            "tasks": [{"task": "wikitext2", "options": {"windows": 1, "seq_len": 16}}],
        }
    )
    records = run_sweep(grid, tmp_path / "results.jsonl", progress=False)
    compressed = [r for r in records if r["cell"]["label"] != "dense"]
    assert {r["cell"]["recipe"]["pipeline"] for r in compressed} == {"independent", "sequential"}
    assert all(r["status"] == "ok" for r in compressed)
    perplexities = {r["metrics"]["perplexity"] for r in compressed}
    assert len(perplexities) == 2  # the two pipelines compress differently
    with pytest.raises(ValueError, match="pipeline"):
        SweepRecipe.model_validate(
            {**grid.model_dump(), "methods": [{"method": "svd", "recipe": {"ratio": 2}}]}
        )


def test_a_quantization_stage_is_part_of_a_cell_and_of_its_default_label():
    from aecompress.sweep import cell_id, cell_recipe, cells

    stages = ["int4:g64", {"bits": 4, "group": 64, "method": "gptq"}, "int3:g64", None]
    methods = [{"method": "sparsegpt"} | ({"recipe": {"quantize": s}} if s else {}) for s in stages]
    plan = recipe("m").model_copy(
        update={"ratios": [4.92], "methods": [MethodSpec.model_validate(m) for m in methods]}
    )
    grid = list(cells(plan))
    labels = [cell["label"] for cell in grid]
    assert labels == ["sparsegpt + int4:g64:gptq"] * 2 + ["sparsegpt + int3:g64:gptq", "sparsegpt"]
    assert cell_id(grid[0]) == cell_id(grid[1])  # one stage spelled two ways is one cell
    assert len({cell_id(cell) for cell in grid}) == 3
    built = [cell_recipe(plan, cell).quantize for cell in grid]
    assert [(q.bits, q.group) if q else None for q in built] == [(4, 64), (4, 64), (3, 64), None]
    with pytest.raises(ValueError, match=r"recipe\.bits"):
        MethodSpec.model_validate({"method": "sparsegpt", "recipe": {"quantize": "int9:g64"}})


def test_validation_and_test_plots_of_a_task_are_separate_files(tmp_path):
    cell = {"model": "m", "label": "svd", "targets": "k", "group": "none", "ratio": 2}
    records = [
        {"cell": cell, "status": "ok", "task": "wikitext2", "split": split}
        | {"settings": {"split": split}, "metrics": {"perplexity": value}}
        for split, value in [("validation", 20.0), ("test", 30.0)]
    ]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    written = write_report([results], read_results(results))
    assert sorted(p.name for p in written if p.suffix == ".png") == [
        "m_k_wikitext2_test_perplexity.png",
        "m_k_wikitext2_validation_perplexity.png",
    ]


@pytest.mark.parametrize(
    "method,message",
    [
        ({"method": "svdd"}, "unknown method 'svdd'"),
        ({"method": "svd", "options": {"rnk": 3}}, "rnk: Extra inputs are not permitted"),
    ],
)
def test_an_invalid_cell_fails_the_sweep_before_any_work(tmp_path, monkeypatch, method, message):
    monkeypatch.setattr("aecompress.sweep.load_model", lambda name: pytest.fail("loaded"))
    plan = recipe("m").model_copy(update={"methods": [MethodSpec.model_validate(method)]})
    with pytest.raises(AecompressError, match=f"sweep cell .*ratio 2.*: .*{message}"):
        run_sweep(plan, tmp_path / "results.jsonl", progress=False)
    assert not (tmp_path / "results.jsonl").exists()


def test_the_glue_probe_recipe_is_the_paper_grid_scored_by_every_probe():
    from aecompress.evaluation.glue import GLUE_TASKS
    from aecompress.sweep import cell_recipe, cells

    folder = Path(__file__).parents[1] / "benchmarks" / "recipes"
    probe, paper = (
        SweepRecipe.from_yaml(folder / f"{n}.yaml") for n in ("glue-probe", "paper-grid")
    )
    assert list(cells(probe)) == list(cells(paper))
    assert [t.task for t in probe.tasks] == [f"glue-{name}-probe" for name in GLUE_TASKS]
    for cell in cells(probe):
        cell_recipe(probe, cell)  # every cell is valid


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "benchmarks" / "recipes").glob("*.yaml")), ids=str
)
def test_every_committed_sweep_recipe_builds_every_cell(path):
    from aecompress.sweep import cell_recipe, cells

    grid = SweepRecipe.from_yaml(path)
    built = [cell_recipe(grid, cell) for cell in cells(grid)]
    assert built and all(r.targets for r in built)


DENSE_RECORD = {
    "cell": {"model": "m", "label": "dense", "ratio": 1.0},
    "task": "wikitext2",
    "status": "ok",
    "split": "test",
    "metrics": {"perplexity": 30.0},
}


@pytest.mark.parametrize(
    "line",
    [
        {"cell": []},
        {"cell": [], "task": "wikitext2"},
        {**DENSE_RECORD, "metrics": None},
        {k: v for k, v in DENSE_RECORD.items() if k != "metrics"},
        {**DENSE_RECORD, "metrics": {"perplexity": "30"}},
        {**DENSE_RECORD, "cell": {"model": "m", "label": "dense"}},
        {**DENSE_RECORD, "cell": {**DENSE_RECORD["cell"], "targets": ["k"]}},
        {**DENSE_RECORD, "status": "maybe"},
        {**DENSE_RECORD, "task": 3},
        [1, 2],
    ],
)
def test_lines_that_are_not_records_are_skipped_by_sweep_and_report(
    tiny_folder, tmp_path, caplog, line
):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(line) + "\n" + json.dumps(DENSE_RECORD) + "\n")
    assert read_results(results) == [DENSE_RECORD]
    assert "skipping 1 line(s) that are not sweep records" in caplog.text
    write_report([results], read_results(results))
    plan = recipe(tiny_folder).model_copy(update={"ratios": [1e9]})  # fails before any work
    records = run_sweep(plan, results, progress=False)
    assert records[0] == DENSE_RECORD and len(records) == 3  # the dense cell was measured


def test_a_relative_model_path_from_another_folder_is_another_model(
    tmp_path, tokenizer, monkeypatch
):
    from tests.conftest import tiny_model

    for folder, seed in (("a", 0), ("b", 1)):
        tiny_model("llama", seed).save_pretrained(tmp_path / folder / "models" / "tiny")
        tokenizer.save_pretrained(tmp_path / folder / "models" / "tiny")
    results = tmp_path / "results.jsonl"
    plan = recipe("models/tiny").model_copy(update={"ratios": [2]})
    calls = counting_compress(monkeypatch)
    for folder in ("a", "b", "a"):
        monkeypatch.chdir(tmp_path / folder)
        run_sweep(plan, results, progress=False)
    assert calls == [2, 2]  # b's model was measured; a's again was not
    records = read_results(results)
    by_model = {}
    for record in records:
        by_model.setdefault(record["cell"]["model_id"], []).append(record["metrics"])
    assert len(records) == 4 and len(by_model) == 2
    assert [path.rpartition("@")[0] for path in sorted(by_model)] == [
        str((tmp_path / folder / "models" / "tiny").resolve()) for folder in "ab"
    ]
    first, second = by_model.values()
    assert first != second  # each folder's own numbers
    tiny_model("llama", 2).save_pretrained(tmp_path / "a" / "models" / "tiny")  # new weights
    monkeypatch.chdir(tmp_path / "a")
    run_sweep(plan, results, progress=False)
    assert calls == [2, 2, 2]


@pytest.mark.parametrize(
    "task,problem",
    [
        ("{task: wikitext2, options: {full: 'false'}}", "full: Input should be a valid boolean"),
        ("{task: piqa, options: {split: [test]}}", "split: Input should be a valid string"),
        ("{task: piqa, options: {limt: 3}}", "task 'piqa' has no option limt"),
        ("{task: wikitext3}", "unknown task 'wikitext3'"),
    ],
)
def test_task_entries_are_validated_when_the_recipe_is_read(tmp_path, task, problem):
    """By the task's own options model: a string "false" does not run every window."""
    path = tmp_path / "grid.yaml"
    path.write_text(
        "name: g\nmodels: [m]\nmethods: [{method: svd}]\nratios: [2]\ntargets: [k]\n"
        f"tasks: [{task}]\n"
    )
    with pytest.raises(AecompressError, match=f"sweep recipe {path}: tasks.0: .*{problem}"):
        SweepRecipe.from_yaml(path)
