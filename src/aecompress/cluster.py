"""Sweeps on a Ray cluster: each job is a Ray task; the driver writes every record.

Ray is an optional dependency (`pip install 'aecompress[ray]'`); aecompress must be
installed on every node, and the models and data must be readable there.
"""

from __future__ import annotations

from typing import Any

from aecompress.errors import AecompressError
from aecompress.models import load_model
from aecompress.sweep import Job, Record, SweepRecipe, failure_record, run_job


def _run_remotely(sweep: SweepRecipe, job: Job) -> list[dict[str, Any]]:
    """A job in a Ray worker: its records, returned to the driver."""
    records: list[dict[str, Any]] = []
    run_job(sweep, job, load_model(job.cell["model"]), records.append, progress=False)
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
