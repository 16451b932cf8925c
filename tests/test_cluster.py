import os
import sys

import pytest

# the local Ray instance on the loopback address only (read when ray is imported)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray

from aecompress.cluster import RayExecutor
from aecompress.errors import AecompressError
from aecompress.sweep import SweepRecipe, run_sweep
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


class Ref:
    def __init__(self, value):
        self.value = value


class FakeRay:
    """Runs each task at once in this process and remembers what the tasks asked for."""

    class exceptions:  # as ray names it
        RayError = RuntimeError

    def __init__(self):
        self.asked = []

    def is_initialized(self):
        return True

    def remote(self, function):
        fake = self

        class Task:
            def options(self, **resources):
                fake.asked.append(resources)
                return self

            def remote(self, *args):
                return Ref(function(*args))

        return Task()

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref.value


def test_each_task_asks_for_the_recipes_resources(tiny_folder, tmp_path, monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    resources = {"ratios": [2], "resources": {"cpus": 2, "gpus": 0.5}}
    plan = SweepRecipe.model_validate({**recipe(tiny_folder).model_dump(), **resources})
    records = run_sweep(plan, tmp_path / "results.jsonl", executor=RayExecutor())
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert fake.asked == [{"num_cpus": 2, "num_gpus": 0.5, "max_retries": 0}]
