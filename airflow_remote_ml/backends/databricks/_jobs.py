"""The databricks backend's jobs: one-time runs whose name ends with a step identity's token.

``GET /api/2.2/jobs/runs/list`` (``run_type=SUBMIT_RUN``, newest first, at most 25 a page, paged with
``next_page_token``) lists them: the active runs, then the runs completed within ``find_lookback_hours``.
The Jobs API keeps no tags on submitted runs, so a run is ours when its ``run_name`` ends with
``remote-ml-<digest>`` (see ``_payload.run_name``); ``expand_tasks=true`` brings the task's description,
whose manifest URI names the whole identity.

Nothing is removed: a finished run keeps no resources (its job cluster terminates with it) and its record
is the workspace's own history, which the workspace expires on its own (60 days).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.backends.databricks._payload import parse_description
from airflow_remote_ml.backends.databricks._states import status_from_run
from airflow_remote_ml.core.jobs import JobInfo, identity_from_manifest_uri
from airflow_remote_ml.core.status import RunHandle

if TYPE_CHECKING:
    from airflow_remote_ml.backends.databricks._backend import DatabricksBackend

_TOKEN = re.compile(r" (remote-ml-[0-9a-f]{40})$")
#: Pages of 25 runs read per pass; ``jobs list`` reads further back than ``find`` does.
LIST_MAX_PAGES = 40


def _ms(value: Any) -> float | None:
    return float(value) / 1000.0 if value else None


def _job(backend: DatabricksBackend, run: dict[str, Any], token: str) -> JobInfo:
    tasks = run.get("tasks") or [{}]
    meta = parse_description(tasks[0].get("description")) or {}
    identity = identity_from_manifest_uri(meta.get("manifest_uri"))
    if identity is not None and identity.idempotency_token != token:
        identity = None
    status = status_from_run(run, success_with_failures_is_success=backend.config.success_with_failures_is_success)
    run_id = int(run["run_id"])
    readable = str(run.get("run_name") or "")[: -len(token) - 1]
    dag_task = readable.split(" #")[0]
    return JobInfo(
        backend=backend.name,
        job_id=str(run_id),
        identity=identity,
        dag_id=dag_task.rsplit(".", 1)[0] if "." in dag_task else None,
        state="terminal" if status.is_terminal else "running",
        remote_state=status.remote_state,
        created=_ms(run.get("start_time")),
        finished=_ms(run.get("end_time")) if status.is_terminal else None,
        url=run.get("run_page_url"),
        handle=RunHandle(backend.name, str(run_id), run.get("run_page_url"), {
            "run_id": run_id, "manifest_uri": meta.get("manifest_uri"),
            "declared_outputs": sorted(meta.get("outputs") or {})}),
        removable=False,
        where=str(run.get("run_name") or ""),
    )


def list_jobs(backend: DatabricksBackend, dag_id: str | None = None) -> list[JobInfo]:
    """The runs of this provider: active ones, then those completed within ``find_lookback_hours``."""
    since = int((time.time() - backend.config.find_lookback_hours * 3600) * 1000)
    passes: list[dict[str, Any]] = [{"active_only": "true"},
                                    {"completed_only": "true", "start_time_from": since}]
    found: dict[str, JobInfo] = {}
    for extra in passes:
        page_token = None
        for _ in range(LIST_MAX_PAGES):
            query = {"run_type": "SUBMIT_RUN", "expand_tasks": "true", "limit": 25, **extra,
                     **({"page_token": page_token} if page_token else {})}
            answer = backend._call(backend._list_ep, query, "listing runs")
            for run in answer.get("runs") or []:
                match = _TOKEN.search(str(run.get("run_name") or ""))
                if match:
                    job = _job(backend, run, match.group(1))
                    found.setdefault(job.job_id, job)  # a run that completed between the passes: keep one
            page_token = answer.get("next_page_token")
            if not page_token or not answer.get("has_more", True):
                break
    jobs = [j for j in found.values() if dag_id is None or j.dag_id == dag_id]
    jobs.sort(key=lambda j: (j.created or 0.0, j.job_id), reverse=True)
    return jobs


def remove(backend: DatabricksBackend, job: JobInfo) -> None:
    """Nothing to remove: a finished run holds no resources, and its record is the workspace's history."""
