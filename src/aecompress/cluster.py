"""Sweep executors beyond this process: a child process per job, or Ray tasks on a
cluster; either way the driver writes every record.

`ProcessExecutor` measures each job alone: its child's wall time and peak resident
memory (the kernel's high-water mark of that process, read when it is reaped).
Ray is an optional dependency (`pip install 'aecompress[ray]'`); aecompress must be
installed on every node, and the models and data must be readable there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aecompress.errors import AecompressError
from aecompress.models import load_model
from aecompress.sweep import (
    Job,
    Record,
    SweepRecipe,
    TaskSpec,
    cell_model,
    failure_record,
    read_results,
    record_key,
    run_job,
)


class ProcessExecutor:
    """Run each job, one after the other, in a fresh Python process that loads the model,
    compresses and evaluates; each of its records gets `wall_seconds` (the child's life)
    and `peak_rss_bytes` (its peak resident memory). A child that dies leaves failure
    records for the tasks it did not record."""

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def __call__(self, sweep: SweepRecipe, jobs: list[Job], record: Record) -> None:
        with tempfile.TemporaryDirectory(prefix="aecompress-sweep-") as folder:
            for number, job in enumerate(jobs):
                for each in self.run_child(sweep, job, Path(folder) / f"job{number}"):
                    record(each)

    def run_child(self, sweep: SweepRecipe, job: Job, stem: Path) -> list[dict[str, Any]]:
        """The job's records from a child process, with the child's time and peak RSS."""
        job_file, records_file = stem.with_suffix(".json"), stem.with_suffix(".jsonl")
        job_file.write_text(json.dumps(_job_json(sweep, job, self.progress)))
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", __name__, str(job_file), str(records_file)])
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = code = os.waitstatus_to_exitcode(status)
        peak_file = records_file.with_suffix(".peak")
        measured = {
            "wall_seconds": time.perf_counter() - start,
            # the child's own high-water mark; rusage's counts the parent's memory at fork
            "peak_rss_bytes": int(peak_file.read_text())
            if peak_file.exists()
            else usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024),
        }
        records = read_results(records_file)
        recorded = {record_key(r) for r in records}
        for spec in job.tasks:
            failure = _child_failure(job, spec, code)
            if record_key(failure) not in recorded:
                records.append(failure)
        return [{**r, **measured} for r in records]


def _job_json(sweep: SweepRecipe, job: Job, progress: bool) -> dict[str, Any]:
    return {
        "sweep": sweep.model_dump(mode="json"),
        "cell": job.cell,
        "tasks": [spec.model_dump(mode="json") for spec in job.tasks],
        "progress": progress,
    }


def _child_failure(job: Job, spec: TaskSpec, code: int) -> dict[str, Any]:
    """The failure record of a task that the job's child process did not record."""
    try:
        raise ChildProcessError(f"the cell's process ended with exit code {code} before this task")
    except ChildProcessError as error:
        return failure_record(job.cell, spec, error)


def run_child_job(job_file: Path, records_file: Path) -> None:
    """In the child: run the job described in `job_file`, appending its records as JSON
    lines to `records_file`."""
    data = json.loads(job_file.read_text())
    sweep = SweepRecipe.model_validate(data["sweep"])
    job = Job(data["cell"], [TaskSpec.model_validate(spec) for spec in data["tasks"]])

    def write(record: dict[str, Any]) -> None:
        with records_file.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    run_job(sweep, job, load_model(cell_model(job.cell)), write, progress=data["progress"])
    peak = own_peak_rss()
    if peak is not None:
        records_file.with_suffix(".peak").write_text(str(peak))


def own_peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux: VmHWM, which belongs to the
    address space exec made, unlike rusage's maxrss, which starts at the parent's memory
    when it forked); None where /proc is missing."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _run_remotely(sweep: SweepRecipe, job: Job) -> list[dict[str, Any]]:
    """A job in a Ray worker: its records, returned to the driver."""
    records: list[dict[str, Any]] = []
    run_job(sweep, job, load_model(cell_model(job.cell)), records.append, progress=False)
    return records


class RayExecutor:
    """Run a sweep's jobs as Ray tasks on the cluster at `address` (None: a running local
    instance or a new one; "auto": the one `ray start` started on this node)."""

    def __init__(self, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as error:
            raise AecompressError(
                "--executor ray needs Ray: pip install 'aecompress[ray]'"
            ) from error
        self.ray = ray
        self.address = address

    def __call__(self, sweep: SweepRecipe, jobs: list[Job], record: Record) -> None:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        task = ray.remote(_run_remotely).options(
            num_cpus=sweep.resources.cpus, num_gpus=sweep.resources.gpus, max_retries=0
        )
        running = {task.remote(sweep, job): job for job in jobs}
        while running:
            (ready,), _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ready)
            try:
                records = ray.get(ready)
            except ray.exceptions.RayError as error:  # a lost worker or node
                records = [failure_record(job.cell, spec, error) for spec in job.tasks]
            for each in records:
                record(each)


if __name__ == "__main__":  # a ProcessExecutor's child: python -m aecompress.cluster JOB RECORDS
    run_child_job(Path(sys.argv[1]), Path(sys.argv[2]))
