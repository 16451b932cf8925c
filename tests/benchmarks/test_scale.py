import json

import pytest

from tests.benchmarks.conftest import run_script


@pytest.mark.usefixtures("children_in_this_process")
def test_quick_run_measures_every_step_on_a_tiny_shape(tmp_path):
    run_script("scale", "--quick", "--out", str(tmp_path))
    facts = json.loads((tmp_path / "scale-quick.json").read_text())
    assert list(facts["steps"]) == ["imports", "build", "svdllm", "sparsegpt"]
    assert facts["model_bytes"] > 0 and facts["quick"]
    assert all(step["peak_rss_bytes"] > 0 for step in facts["steps"].values())
    assert "smoke test" in (tmp_path / "scale-quick.md").read_text()
