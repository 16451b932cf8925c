"""Sweep executors beyond this process: a child process per job, or Ray tasks on a
cluster; either way the driver writes every record.

`ProcessExecutor` measures each job alone: its child's wall time and peak resident
memory (the kernel's high-water mark of that process). Each record the child writes is
passed on as soon as it is whole, so a sweep stopped during a job keeps the tasks done.
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
    record_key,
    run_job,
)


class ProcessExecutor:
    """Run each job, one after the other, in a fresh Python process that loads the model,
    compresses and evaluates. Each record the child writes is recorded as it appears, with
    `wall_seconds` (the child's time so far) and `peak_rss_bytes` (its peak resident memory
    so far); where the child's memory cannot be read while it runs (no /proc), its records
    wait for its end. A child that dies leaves failure records for the tasks it did not
    record."""

    poll_seconds = 1.0  # the longest wait between two looks at the child

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def __call__(self, sweep: SweepRecipe, jobs: list[Job], record: Record) -> None:
        with tempfile.TemporaryDirectory(prefix="aecompress-sweep-") as folder:
            for number, job in enumerate(jobs):
                self.run_child(sweep, job, Path(folder) / f"job{number}", record)

    def command(self, job_file: Path, records_file: Path) -> list[str]:
        """The child's command line."""
        return [sys.executable, "-m", __name__, str(job_file), str(records_file)]

    def run_child(self, sweep: SweepRecipe, job: Job, stem: Path, record: Record) -> None:
        """Run `job` in a child process, recording each of its records as it appears."""
        job_file, records_file = stem.with_suffix(".json"), stem.with_suffix(".jsonl")
        job_file.write_text(json.dumps(_job_json(sweep, job, self.progress)))
        start = time.perf_counter()
        child = subprocess.Popen(self.command(job_file, records_file))
        written = _AppendedLines(records_file)
        recorded: set[str] = set()

        def forward(records: list[dict[str, Any]], peak: int) -> None:
            measured = {"wall_seconds": time.perf_counter() - start, "peak_rss_bytes": peak}
            for each in records:
                recorded.add(record_key(each))
                record({**each, **measured})

        waiting: list[dict[str, Any]] = []
        delay = 0.05
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            waiting += written.new()
            if waiting and (peak := peak_rss(child.pid)) is not None:
                forward(waiting, peak)
                waiting = []
            time.sleep(delay)
            delay = min(2 * delay, self.poll_seconds)
        child.returncode = code = os.waitstatus_to_exitcode(status)
        peak_file = records_file.with_suffix(".peak")
        # the child's own high-water mark; rusage's counts the parent's memory at fork
        final = int(peak_file.read_text()) if peak_file.exists() else usage.ru_maxrss * RSS_UNIT
        forward(waiting + written.new(), final)
        failures = [_child_failure(job, spec, code) for spec in job.tasks]
        forward([f for f in failures if record_key(f) not in recorded], final)


RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # rusage's ru_maxrss: bytes or kB


class _AppendedLines:
    """The JSON lines appended to a file since the last call (a line still being written
    waits for its newline)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        whole = data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        return [json.loads(line) for line in whole.splitlines() if line.strip()]


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
    peak = peak_rss()
    if peak is not None:
        records_file.with_suffix(".peak").write_text(str(peak))


def peak_rss(pid: int | str = "self") -> int | None:
    """A process's peak resident memory in bytes (Linux: VmHWM, which belongs to the
    address space exec made, unlike rusage's maxrss, which starts at the parent's memory
    when it forked); None where /proc is missing."""
    status = Path(f"/proc/{pid}/status")
    try:
        text = status.read_text()
    except OSError:
        return None
    for line in text.splitlines():
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
