"""The local backend's jobs, read from its job directories (see :mod:`._backend` for what each holds).

A job directory is named after the identity's digest and holds ``step.json`` (with the identity), the
runtime's ``pid``, its ``exit_code`` once it ended and ``finished`` once Airflow was done with it. Listing
reads those files; removing deletes the directory.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING

from airflow_remote_ml.core.errors import BackendAPIError
from airflow_remote_ml.core.jobs import JobInfo, identity_from_json

if TYPE_CHECKING:
    from airflow_remote_ml.backends.local._backend import LocalBackend


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _read_time(path: str) -> float | None:
    """The time a marker file holds (``mark_finished``/``cancel`` write ``time.time()``), else its mtime."""
    try:
        with open(path, encoding="utf-8") as fh:
            return float(fh.read().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return _mtime(path)


def job_info(backend: LocalBackend, job_id: str) -> JobInfo | None:
    """The job in directory ``job_id``, or ``None`` when it is no job directory of ours."""
    job_dir = os.path.join(backend.config.state_dir, job_id)
    try:
        with open(os.path.join(job_dir, "step.json"), encoding="utf-8") as fh:
            step = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(step, dict) or not os.path.exists(os.path.join(job_dir, "pid")):
        return None  # a start that failed before the process existed: nothing ran, nothing to report
    handle = backend._handle(job_id, step)
    status = backend.poll(handle)
    exit_file = os.path.join(job_dir, "exit_code")
    finished = _mtime(exit_file) if os.path.exists(exit_file) else None
    if finished is None and status.is_terminal:
        # Killed without writing its exit code: it ended at the latest when it was cancelled or marked.
        finished = _read_time(os.path.join(job_dir, "cancelled")) or _read_time(os.path.join(job_dir, "finished"))
    return JobInfo(
        backend=backend.name,
        job_id=job_id,
        identity=identity_from_json(step.get("identity")),
        state="terminal" if status.is_terminal else "running",
        remote_state=status.state.value,
        created=_mtime(os.path.join(job_dir, "pid")),
        finished=finished,
        marked_finished=os.path.exists(os.path.join(job_dir, "finished")),
        url=None,
        handle=handle,
        removable=True,
        where=job_dir,
    )


def list_jobs(backend: LocalBackend, dag_id: str | None = None) -> list[JobInfo]:
    """Every job directory under ``state_dir`` (of ``dag_id`` only, when given), newest first."""
    try:
        names = os.listdir(backend.config.state_dir)
    except FileNotFoundError:
        return []
    jobs = []
    for name in names:
        job = job_info(backend, name)
        if job is not None and (dag_id is None or job.dag_id == dag_id):
            jobs.append(job)
    jobs.sort(key=lambda j: (j.created or 0.0, j.job_id), reverse=True)
    return jobs


def remove(backend: LocalBackend, job: JobInfo) -> None:
    """Delete the job's directory (its step file and log). A job still running is refused: cancel it first."""
    job_dir = os.path.join(backend.config.state_dir, job.job_id)
    current = job_info(backend, job.job_id)
    if current is not None and current.running:
        raise BackendAPIError(backend.name, f"job {job.job_id} is still running (see {job_dir}); cancel it first", 409)
    shutil.rmtree(job_dir, ignore_errors=True)
    backend._children.pop(job.job_id, None)
    backend._watches.pop(job.job_id, None)
