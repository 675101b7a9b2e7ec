"""The docker backend's jobs: containers found by the identity labels every step container carries.

One ``GET /containers/json?all=1&filters={"label": ["app.kubernetes.io/managed-by=airflow-remote-ml", ...]}``
lists them all (the engine filters by label server-side, see :func:`label_filter`); a container's end time
and its creation to the nanosecond are only in its inspect document, read per container only where needed.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.backends.docker._config import LABEL_MANIFEST, MARK_FINISHED
from airflow_remote_ml.backends.docker._containers import marks, status_from_inspect
from airflow_remote_ml.core import jobs as core_jobs
from airflow_remote_ml.core.identity import LABEL_DAG_ID, LABEL_MANAGED_BY, LABEL_STEP_ID, LABEL_TASK_ID, MANAGED_BY
from airflow_remote_ml.core.jobs import (
    RETIRE_BATCH,
    JobInfo,
    identity_from_manifest_uri,
    remove_jobs,
    retention_of,
)
from airflow_remote_ml.core.status import RunHandle

if TYPE_CHECKING:
    from airflow_remote_ml.backends.docker._backend import DockerBackend

log = logging.getLogger(__name__)

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
    created = float(summary["Created"]) if summary.get("Created") is not None else None
    if attrs is not None:
        status = status_from_inspect(attrs)
        running = not status.is_terminal
        remote = str((attrs.get("State") or {}).get("Status") or remote)
        finished = _engine_time((attrs.get("State") or {}).get("FinishedAt")) if not running else None
        created = _engine_time(attrs.get("Created")) or created  # to the nanosecond, where the list has seconds
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
        created=created,
        finished=finished,
        marked_finished=MARK_FINISHED in marks(name),
        handle=handle,
        removable=True,
        where=name.lstrip("/"),
    )


def label_filter(backend: DockerBackend) -> list[str]:
    """Ours, and carrying every label the configuration puts on its containers: two deployments that share an
    engine and set ``labels`` each see (and retire) only their own.

    Several ``label`` filters must all match (the engine's list filter, ``docker ps --filter label=a
    --filter label=b``; docker-py documents ``label`` as "a list of such" in ``APIClient.containers``)."""
    return [f"{LABEL_MANAGED_BY}={MANAGED_BY}", *(f"{k}={v}" for k, v in sorted(backend.config.labels.items()))]


def _summaries(backend: DockerBackend) -> list[dict[str, Any]]:
    with backend._mapped("listing containers"):
        return list(backend.api.containers(all=True, filters={"label": label_filter(backend)}))


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
    """The retention policy as one container finishes: one list call, and inspects only where needed.

    The list says when each container was created, to the second; its inspect document says it to the
    nanosecond, and when it ended. The count limit ranks by creation: only containers created in the very
    second where the rank crosses ``max_count`` are inspected, to order them. The age limit needs the end:
    only containers created before the cutoff (a container ends after it was created) are inspected, at
    most :data:`RETIRE_BATCH` of them. At most :data:`RETIRE_BATCH` are removed.
    """
    retention = retention_of(backend.config, backend.name)
    if retention.max_age is None and retention.max_count is None:
        return []
    try:
        summaries = {s["Id"][:12]: s for s in _summaries(backend)}
    except Exception as exc:  # housekeeping: the step's own outcome stands, the next finish retries
        log.warning("docker: could not list containers for the retention policy: %s", exc)
        return []
    done = [j for j in (_job(backend, s, None) for s in summaries.values())
            if not j.running and j.marked_finished]
    inspected: dict[str, JobInfo] = {}

    def precise(job: JobInfo) -> JobInfo:
        if job.job_id not in inspected:
            attrs = _inspect(backend, summaries[job.job_id]["Id"])
            inspected[job.job_id] = _job(backend, summaries[job.job_id], attrs) if attrs is not None else job
        return inspected[job.job_id]

    chosen: dict[str, JobInfo] = {}
    if retention.max_count is not None and len(done) > retention.max_count:
        # The container that just finished is the newest, whatever the second it was created in.
        def rank(j: JobInfo) -> tuple[bool, float, str]:
            return (j.job_id == keep, j.created or 0.0, j.job_id)

        done.sort(key=rank, reverse=True)
        boundary = done[retention.max_count].created
        tied = [j for j in done if j.created == boundary]
        if len(tied) > 1:
            done = sorted([precise(j) if j.created == boundary else j for j in done], key=rank, reverse=True)
        chosen.update((j.job_id, j) for j in done[retention.max_count:])
    if retention.max_age is not None:
        cutoff = core_jobs.clock() - retention.max_age
        old = sorted((j for j in done if (j.created or 0.0) < cutoff and j.job_id not in chosen),
                     key=lambda j: j.created or 0.0)
        for job in old[:RETIRE_BATCH]:
            job = precise(job)
            if job.finished is not None and job.finished < cutoff:
                chosen[job.job_id] = job
    ordered = sorted((j for j in chosen.values() if j.job_id != keep), key=lambda j: j.created or 0.0)
    removed = remove_jobs(backend, ordered)
    if removed:
        log.info("docker: removed %d finished container(s) by the retention policy (max_age=%s s, max_count=%s)",
                 len(removed), retention.max_age, retention.max_count)
    return removed
