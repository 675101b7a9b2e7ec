"""The valohai backend's jobs: executions of the project that carry a ``remote-ml:<digest>`` tag.

``GET /api/v0/executions/?project=<id>&ordering=-ctime`` (paged) lists them; the API cannot filter on
tags, so the newest ``find_scan_limit`` executions are scanned, as ``find`` does. The identity comes from
the step document the runtime reads (``REMOTE_ML_STEP`` in the execution's environment, runtime mode),
checked against the tag; a plain Valohai step (step mode) only says its DAG and task in readable tags.

Nothing is removed: a finished execution holds no machine, and it is the lineage record of its outputs
(datums other steps may read as ``datum://`` URIs); deleting executions is left to the platform's own
data retention.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.backends.valohai._execution import IDENTITY_TAG_PREFIX, _handle_data, map_status
from airflow_remote_ml.core.jobs import JobInfo, identity_from_json

if TYPE_CHECKING:
    from airflow_remote_ml.backends.valohai._backend import ValohaiBackend


def _time(value: Any) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _identity(execution: dict[str, Any], digest: str) -> Any:
    env = execution.get("environment_variables") or {}
    try:
        step = json.loads(env.get("REMOTE_ML_STEP") or "null")
    except (TypeError, ValueError):
        return None
    identity = identity_from_json(step.get("identity")) if isinstance(step, dict) else None
    return identity if identity is not None and identity.digest == digest else None


def _tag(tags: list[str], prefix: str) -> str | None:
    return next((t[len(prefix):] for t in tags if t.startswith(prefix)), None)


def _job(backend: ValohaiBackend, execution: dict[str, Any], digest: str) -> JobInfo:
    status = map_status(execution)
    tags = [str(t) for t in execution.get("tags") or []]
    handle = backend._handle(execution, _handle_data(execution))
    return JobInfo(
        backend=backend.name,
        job_id=str(execution["id"]),
        identity=_identity(execution, digest),
        dag_id=_tag(tags, "dag:"),
        task_id=_tag(tags, "task:"),
        state="terminal" if status.is_terminal else "running",
        remote_state=status.remote_state,
        created=_time(execution.get("ctime")),
        finished=_time(execution.get("end_time")) if status.is_terminal else None,
        url=handle.url,
        handle=handle,
        removable=False,
        where=f"#{execution.get('counter')} {execution.get('title') or ''}".strip(),
    )


def list_jobs(backend: ValohaiBackend, dag_id: str | None = None) -> list[JobInfo]:
    """The project's executions of this provider among its newest ``find_scan_limit``, newest first."""
    settings = backend.settings
    params = {"project": backend.project_id(), "ordering": "-ctime", "limit": max(1, settings.find_page_size)}
    jobs = []
    for scanned, execution in enumerate(backend.api.paged("executions/", params)):
        if scanned >= settings.find_scan_limit:
            break
        tags = [str(t) for t in execution.get("tags") or []]
        digest = _tag(tags, IDENTITY_TAG_PREFIX)
        if digest is None:
            continue
        if "environment_variables" not in execution and not map_status(execution).is_terminal:
            # A list entry may leave the environment out; a running one needs its identity (orphan check).
            execution = backend.api.request("GET", f"executions/{execution['id']}/",
                                            params={"exclude": "events,metadata"})
        job = _job(backend, execution, digest)
        if dag_id is None or job.dag_id == dag_id:
            jobs.append(job)
    return jobs


def remove(backend: ValohaiBackend, job: JobInfo) -> None:
    """Nothing to remove: a finished execution holds no machine; it is the record of its outputs' lineage."""
