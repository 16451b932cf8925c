import sys

import pytest
import ray

from aecompress.cluster import RayExecutor
from aecompress.errors import AecompressError
from aecompress.sweep import run_sweep
from tests import test_sweep
from tests.test_sweep import recipe

tiny_folder = test_sweep.tiny_folder  # the fixture

TIMING = {"seconds", "compress_seconds", "traceback"}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def without_timing(records):
    return sorted(
        ({k: v for k, v in r.items() if k not in TIMING} for r in records),
        key=lambda r: (r["cell"]["label"], r["cell"]["ratio"]),
    )


def test_a_ray_sweep_records_what_the_serial_sweep_records(local_ray, tiny_folder, tmp_path):
    plan = recipe(tiny_folder).model_copy(update={"ratios": [2, 1e9]})  # 1e9 fails
    serial = run_sweep(plan, tmp_path / "serial.jsonl", progress=False)
    results = tmp_path / "ray.jsonl"
    on_ray = run_sweep(plan, results, executor=RayExecutor())
    assert [r["status"] for r in without_timing(on_ray)] == ["ok", "ok", "failed"]
    assert without_timing(on_ray) == without_timing(serial)
    text = results.read_text()
    results.write_text(text[: text.rindex("\n", 0, -1) + 40])  # a torn last line
    again = run_sweep(plan, results, executor=RayExecutor())
    assert without_timing(again) == without_timing(serial)  # the torn cell only, once more
    assert run_sweep(plan, results, executor=RayExecutor()) == again  # nothing left to run


def test_without_ray_the_ray_executor_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(AecompressError, match=r"pip install 'aecompress\[ray\]'"):
        RayExecutor()
