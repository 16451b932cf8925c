import matplotlib

from aecompress.report import NOTES_MARKER, process_costs, ratio_axis, write_report

matplotlib.use("Agg")


def test_ratio_axis_labels_the_grid_ratios_plainly():
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([3, 10, 25], [1, 2, 3])
    ratio_axis(axes, [3, 10, 25])
    figure.canvas.draw()
    assert [t.get_text() for t in axes.get_xticklabels()] == ["3", "10", "25"]
    assert list(axes.get_xticks()) == [3, 10, 25]
    assert axes.get_xticklabels(minor=True) == []
    plt.close(figure)


def _record(label, ratio, task, split="test", value=None, settings=None, **measured):
    cell = {"model": "m", "label": label, "ratio": ratio}
    if label != "dense":
        cell |= {"method": label, "targets": "up", "group": "none", "seed": 0}
    metrics = {"perplexity": value or 10.0 * ratio}
    settings = {"split": split, "batch_size": 4} | (settings or {})
    record = {"cell": cell, "task": task, "split": split, "settings": settings}
    record |= {"status": "ok", "metrics": metrics}
    return record | measured


def test_the_report_gives_each_process_cells_time_and_peak_memory(tmp_path):
    records = [
        _record("dense", 1.0, "wikitext2", wall_seconds=30.0, peak_rss_bytes=700 * 2**20),
        _record("rtn", 4.0, "wikitext2", wall_seconds=12.0, peak_rss_bytes=900 * 2**20),
        _record("rtn", 4.0, "piqa", wall_seconds=12.0, peak_rss_bytes=900 * 2**20),
    ]
    write_report([tmp_path / "results.jsonl"], records)
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| m |")]
    assert rows == ["| m |  | dense | 1 | 0 | 30 | 700 |", "| m | up | rtn | 4 | 0 | 12 | 900 |"]


def test_records_of_a_serial_sweep_have_no_process_table():
    assert process_costs([_record("rtn", 4.0, "wikitext2")]) == ""


def test_each_split_of_a_task_has_its_table_and_its_dense_value(tmp_path):
    records = [
        _record("dense", 1.0, "wikitext2", "validation", 20.0),
        _record("dense", 1.0, "wikitext2", "test", 30.0),
        _record("rtn", 4.0, "wikitext2", "validation", 25.0),
        _record("rtn", 4.0, "wikitext2", "test", 33.0),
    ]
    write_report([tmp_path / "results.jsonl"], records)
    report = (tmp_path / "report.md").read_text()
    assert "(validation)\n\ndense: 20\n" in report and "| rtn | 25 (+5) |" in report
    assert "(test)\n\ndense: 30\n" in report and "| rtn | 33 (+3) |" in report


def test_a_task_run_with_other_settings_has_its_own_table_and_dense_value(tmp_path):
    short, whole = {"seq_len": 512, "full": False}, {"seq_len": 2048, "full": True}
    records = [
        _record("dense", 1.0, "wikitext2", value=36.0, settings=short),
        _record("rtn", 4.0, "wikitext2", value=46.0, settings=short),
        _record("dense", 1.0, "wikitext2", value=21.0, settings=whole),
        _record("rtn", 4.0, "wikitext2", value=25.0, settings=whole),
    ]
    write_report([tmp_path / "results.jsonl"], records)
    report = (tmp_path / "report.md").read_text()
    assert "(test; full false, seq_len 512)\n\ndense: 36\n" in report
    assert "| rtn | 46 (+10) |" in report
    assert "(test; full true, seq_len 2048)\n\ndense: 21\n" in report
    assert "| rtn | 25 (+4) |" in report
    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert plots == [
        "m_up_wikitext2_full-false-seq_len-512_perplexity.png",
        "m_up_wikitext2_full-true-seq_len-2048_perplexity.png",
    ]


def test_values_of_a_tasks_seeds_are_averaged_with_their_spread_dense_and_compressed(tmp_path):
    records = [
        _record(label, ratio, "glue-rte", value=value, settings={"seed": seed, "lr": 1e-4})
        for label, ratio, seed, value in [
            ("dense", 1.0, 0, 58.0),
            ("dense", 1.0, 1, 60.0),
            ("svd", 10.0, 0, 54.0),
            ("svd", 10.0, 1, 55.0),
        ]
    ]
    write_report([tmp_path / "results.jsonl"], records)
    report = (tmp_path / "report.md").read_text()
    assert "glue-rte perplexity (test)\n\ndense: 59 ± 1.4 (2 seeds)\n" in report
    assert "| svd | 54.5 ± 0.71 (2 seeds) (-4.5) |" in report


def test_notes_below_the_marker_are_kept_when_the_report_is_rendered_again(tmp_path):
    records = [_record("dense", 1.0, "wikitext2", value=30.0), _record("rtn", 4.0, "wikitext2")]
    write_report([tmp_path / "results.jsonl"], records)
    report = tmp_path / "report.md"
    notes = f"{NOTES_MARKER}\n\n## How this was run\n\n- by hand\n"
    report.write_text(report.read_text() + "\n" + notes)
    write_report([tmp_path / "results.jsonl"], [*records, _record("gptq", 4.0, "wikitext2")])
    text = report.read_text()
    assert "| gptq | 40 (+10) |" in text and text.endswith(notes) and text.count(NOTES_MARKER) == 1
