import os
import sys

from common import markdown_table, run_process


def test_a_process_run_gives_its_status_output_and_peak_memory():
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    finished = run_process([sys.executable, "-c", code], dict(os.environ))
    assert finished.returncode == 3
    assert finished.last_line("stdout") == "out" and finished.last_line("stderr") == "err"
    assert finished.peak_rss_bytes > 1 << 20 and finished.seconds > 0


def test_a_markdown_table_has_a_header_rule_and_rows():
    lines = markdown_table(["a", "b"], [(1, "x"), (2.5, "")])
    assert lines == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 |  |"]
