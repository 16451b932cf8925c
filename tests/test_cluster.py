import json
import os
import sys
from pathlib import Path

import psutil
import pytest

# the local Ray instance on the loopback address only (read when ray is imported)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray

from aecompress.cluster import ProcessExecutor, RayExecutor, _child_failure
from aecompress.errors import AecompressError
from aecompress.sweep import SweepRecipe, run_sweep
from tests import test_sweep
from tests.test_sweep import recipe

tiny_folder = test_sweep.tiny_folder  # the fixture

TIMING = {"seconds", "compress_seconds", "traceback", "wall_seconds", "peak_rss_bytes"}


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


def test_a_process_sweep_records_what_the_serial_sweep_records_with_time_and_memory(
    tiny_folder, tmp_path
):
    plan = recipe(tiny_folder).model_copy(update={"ratios": [2, 1e9]})  # 1e9 fails
    serial = run_sweep(plan, tmp_path / "serial.jsonl", progress=False)
    measured = run_sweep(plan, tmp_path / "process.jsonl", executor=ProcessExecutor(False))
    assert without_timing(measured) == without_timing(serial)
    for record in measured:  # a cell's process holds at least torch and the model
        assert record["wall_seconds"] > record.get("seconds", 0.0)
        assert 50e6 < record["peak_rss_bytes"] < psutil.virtual_memory().total


def test_each_cells_process_is_measured_alone(tiny_folder, tmp_path, monkeypatch):
    """A cell holding a large buffer shows it in its own peak RSS only (not cumulative)."""
    plan = recipe(tiny_folder)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path), prepend=os.pathsep)
    (tmp_path / "sitecustomize.py").write_text(  # runs in each child at start-up
        "import os\nif os.environ.get('BALLAST'):\n"
        "    ballast = bytearray(int(os.environ['BALLAST']))\n"
        "    ballast[::4096] = b'x' * len(ballast[::4096])\n"
    )
    peaks = {}
    for ballast, results in [("600000000", "heavy.jsonl"), ("", "light.jsonl")]:
        monkeypatch.setenv("BALLAST", ballast)
        records = run_sweep(plan, tmp_path / results, executor=ProcessExecutor(False))
        peaks[results] = {r["peak_rss_bytes"] for r in records if r["cell"]["label"] != "dense"}
    assert min(peaks["heavy.jsonl"]) > max(peaks["light.jsonl"]) + 500e6


def test_a_cell_whose_process_dies_is_recorded_as_failed(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path), prepend=os.pathsep)
    (tmp_path / "sitecustomize.py").write_text("import os\nos._exit(3)\n")
    records = run_sweep(recipe(tiny_folder), tmp_path / "r.jsonl", executor=ProcessExecutor(False))
    assert {r["status"] for r in records} == {"failed"}
    assert {r["error"] for r in records} == {
        "ChildProcessError: the cell's process ended with exit code 3 before this task"
    }
    assert len(records) == 3  # dense and two cells, one task each


def test_a_worker_loads_a_relative_model_path_from_where_the_sweep_ran(
    tiny_folder, tmp_path, monkeypatch
):
    from aecompress import cluster
    from aecompress.sweep import Job, cells

    folder = Path(tiny_folder)
    monkeypatch.chdir(folder.parent)
    sweep = recipe(folder.name)
    cell = next(cells(sweep))
    loaded = []
    monkeypatch.setattr(cluster, "load_model", lambda name: loaded.append(name))
    monkeypatch.setattr(cluster, "run_job", lambda *args, **kwargs: None)
    monkeypatch.chdir(tmp_path)  # a Ray worker's own folder
    cluster._run_remotely(sweep, Job(cell, []))
    assert loaded == [str(folder.resolve())]


CHILD = """
import json, pathlib, sys, time
lines, seen, out = sys.argv[1:]
first, second = pathlib.Path(lines).read_text().splitlines()
with open(out, "a") as handle:
    handle.write(first + "\\n")
for _ in range(600):  # the driver records the first task before the second ends
    if pathlib.Path(seen).exists():
        break
    time.sleep(0.05)
else:
    sys.exit(4)
with open(out, "a") as handle:
    handle.write(second[:10])  # a line being written waits for its end
    handle.flush()
    time.sleep(0.3)
    handle.write(second[10:] + "\\n")
"""


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="no /proc: records wait for the child's end"
)
def test_a_process_job_records_each_task_as_its_child_writes_it(tiny_folder, tmp_path):
    """A sweep stopped during a job keeps the tasks its child has done."""
    from aecompress.sweep import Job, TaskSpec, cells

    plan = recipe(tiny_folder)
    tasks = [TaskSpec(task="wikitext2", options={"windows": n}) for n in (1, 2)]
    job = Job(next(cells(plan)), tasks)
    done = [{**_child_failure(job, spec, 0), "status": "ok"} for spec in tasks]
    (tmp_path / "lines").write_text("\n".join(json.dumps(r) for r in done))
    seen = tmp_path / "seen"

    class Scripted(ProcessExecutor):
        def command(self, job_file, records_file):
            return [
                sys.executable,
                "-c",
                CHILD,
                str(tmp_path / "lines"),
                str(seen),
                str(records_file),
            ]

    recorded = []

    def record(each):
        recorded.append(each)
        seen.touch()

    Scripted(False).run_child(plan, job, tmp_path / "job0", record)
    assert [r["status"] for r in recorded] == ["ok", "ok"]  # the child did not wait in vain
    assert [r["settings"] for r in recorded] == [r["settings"] for r in done]
    first, second = recorded
    assert 0 < first["wall_seconds"] < second["wall_seconds"]
    assert 1e6 < first["peak_rss_bytes"] <= second["peak_rss_bytes"]
