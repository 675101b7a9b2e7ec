"""The docker backend's jobs: containers found by the identity labels every step container carries.

One ``GET /containers/json?all=1&filters={"label": ["app.kubernetes.io/managed-by=airflow-remote-ml"]}``
lists them all (the engine filters by label server-side); a container's end time is only in its inspect
document (``State.FinishedAt``), read per container only where an age limit needs it.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.backends.docker._config import LABEL_MANIFEST, MARK_FINISHED
from airflow_remote_ml.backends.docker._containers import marks, status_from_inspect
from airflow_remote_ml.core.identity import LABEL_DAG_ID, LABEL_MANAGED_BY, LABEL_STEP_ID, LABEL_TASK_ID, MANAGED_BY
from airflow_remote_ml.core.jobs import (
    RETIRE_BATCH,
    JobInfo,
    clock,
    identity_from_manifest_uri,
    retention_of,
    retire,
)
from airflow_remote_ml.core.status import RunHandle

if TYPE_CHECKING:
    from airflow_remote_ml.backends.docker._backend import DockerBackend

# The engine's list answers State as one of these words (Docker Engine API, ContainerSummary.State).
_RUNNING = frozenset({"created", "running", "restarting", "paused"})


def _engine_time(value: Any) -> float | None:
    """Seconds since the epoch from the engine's RFC 3339 times (nanoseconds; ``0001-01-01T00:00:00Z``: never)."""
    if not value or str(value).startswith("0001-"):
        return None
    text = str(value).replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    if rest:  # Python parses at most microseconds: cut the fraction to 6 digits, keep the offset
        digits = "".join(c for c in rest if c.isdigit())
        offset = rest[len(digits):]
        text = f"{head}.{digits[:6]}{offset}"
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _job(backend: DockerBackend, summary: dict[str, Any], attrs: dict[str, Any] | None) -> JobInfo:
    labels = summary.get("Labels") or {}
    name = (summary.get("Names") or ["/"])[0]
    identity = identity_from_manifest_uri(labels.get(LABEL_MANIFEST))
    if identity is not None and identity.digest != labels.get(LABEL_STEP_ID):
        identity = None  # the manifest label names another step than the step-id label: trust neither
    if identity is not None:
        handle = backend._handle(summary["Id"], name, labels, identity)
    else:
        handle = RunHandle(backend=backend.name, job_id=summary["Id"][:12], url=None,
                           data={"container_id": summary["Id"], "name": name.lstrip("/").split(".")[0]})
    remote = str(summary.get("State") or "").lower()
    finished = None
    if attrs is not None:
        status = status_from_inspect(attrs)
        running = not status.is_terminal
        remote = str((attrs.get("State") or {}).get("Status") or remote)
        finished = _engine_time((attrs.get("State") or {}).get("FinishedAt")) if not running else None
    else:
        running = remote in _RUNNING
    return JobInfo(
        backend=backend.name,
        job_id=summary["Id"][:12],
        identity=identity,
        dag_id=labels.get(LABEL_DAG_ID),
        task_id=labels.get(LABEL_TASK_ID),
        state="running" if running else "terminal",
        remote_state=remote,
        created=float(summary["Created"]) if summary.get("Created") is not None else None,
        finished=finished,
        marked_finished=MARK_FINISHED in marks(name),
        handle=handle,
        removable=True,
        where=name.lstrip("/"),
    )


def _summaries(backend: DockerBackend) -> list[dict[str, Any]]:
    with backend._mapped("listing containers"):
        return list(backend.api.containers(all=True, filters={"label": [f"{LABEL_MANAGED_BY}={MANAGED_BY}"]}))


def _inspect(backend: DockerBackend, container_id: str) -> dict[str, Any] | None:
    from airflow_remote_ml.backends.docker._backend import _Gone

    try:
        return backend._inspect(container_id)
    except _Gone:
        return None


def list_jobs(backend: DockerBackend, dag_id: str | None = None) -> list[JobInfo]:
    """Every container of this provider (of ``dag_id`` only), newest first, each inspected for its end."""
    jobs = []
    for summary in _summaries(backend):
        job = _job(backend, summary, None)
        if dag_id is not None and job.dag_id != dag_id:
            continue
        attrs = _inspect(backend, summary["Id"])
        if attrs is None:
            continue  # removed between the list and the inspect
        jobs.append(_job(backend, summary, attrs))
    jobs.sort(key=lambda j: (j.created or 0.0, j.job_id), reverse=True)
    return jobs


def remove(backend: DockerBackend, job: JobInfo) -> None:
    """Remove the container and its anonymous volumes (``DELETE /containers/{id}?v=1&force=1``)."""
    backend._remove(RunHandle(backend.name, job.job_id, None, {"container_id": (job.handle.data["container_id"]
                                                                               if job.handle else job.job_id)}))


def retire_containers(backend: DockerBackend, keep: str | None = None) -> list[JobInfo]:
    """The retention policy as one container finishes: one list call, and inspects only where age needs it.

    The count limit needs only the order (creation time, from the list). An age limit needs the end time,
    read only for containers created before the cutoff (a container ends after it was created), at most
    :data:`RETIRE_BATCH` of them.
    """
    retention = retention_of(backend.config, backend.name)
    if retention.max_age is None and retention.max_count is None:
        return []
    summaries = {s["Id"][:12]: s for s in _summaries(backend)}
    jobs = [_job(backend, s, None) for s in summaries.values()]
    if retention.max_age is not None:
        cutoff = clock() - retention.max_age
        old = [j for j in jobs if not j.running and j.marked_finished and (j.created or 0.0) < cutoff]
        old.sort(key=lambda j: j.created or 0.0)
        refined = {}
        for job in old[:RETIRE_BATCH]:
            attrs = _inspect(backend, summaries[job.job_id]["Id"])
            if attrs is not None:
                refined[job.job_id] = _job(backend, summaries[job.job_id], attrs)
        jobs = [refined.get(j.job_id, j) for j in jobs]
    return retire(backend, retention, jobs=jobs, keep=keep)
