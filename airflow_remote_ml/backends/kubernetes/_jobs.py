"""The kubernetes backend's jobs: the pods of this provider in the backend's namespace.

One ``GET /api/v1/namespaces/{ns}/pods?labelSelector=app.kubernetes.io/managed-by=airflow-remote-ml`` lists
them with everything the listing needs (the API server filters by label; the step container's
``state.terminated.finishedAt`` says when it ended; the identity is the pod's identity annotation).
Removing a pod is ``DELETE .../pods/{name}`` with the cluster's default grace period.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.backends.kubernetes._pod import ANNOTATION_IDENTITY
from airflow_remote_ml.backends.kubernetes._states import (
    LABEL_FINISHED,
    container_status,
    never_ran,
    parse_time,
    status_from_pod,
)
from airflow_remote_ml.core.identity import LABEL_DAG_ID, LABEL_MANAGED_BY, LABEL_TASK_ID, MANAGED_BY
from airflow_remote_ml.core.jobs import JobInfo, identity_from_json

if TYPE_CHECKING:
    from airflow_remote_ml.backends.kubernetes._backend import KubernetesBackend


def _identity(annotations: dict[str, Any]) -> Any:
    try:
        return identity_from_json(json.loads(annotations.get(ANNOTATION_IDENTITY) or "null"))
    except ValueError:
        return None


def _job(backend: KubernetesBackend, pod: dict[str, Any]) -> JobInfo:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    container = backend.config.container_name
    # The startup timeout is the waiting task's rule, not the pod's state: a Pending pod is still running.
    status = status_from_pod(pod, container=container, now=time.time(), startup_timeout=float("inf"))
    deleting = bool(meta.get("deletionTimestamp"))
    # A pod that never ran is still Pending on the cluster whatever its status reads (ErrImageNeverPull...):
    # it would start, unowned, once its cause is fixed, so it counts as running until deleted.
    running = (not status.is_terminal or never_ran(pod)) and not deleting
    terminated = (container_status(pod, container).get("state") or {}).get("terminated") or {}
    finished = parse_time(terminated.get("finishedAt"))
    if finished is None and not running:
        finished = parse_time(meta.get("deletionTimestamp"))
    return JobInfo(
        backend=backend.name,
        job_id=f"{meta.get('namespace')}/{meta.get('name')}",
        identity=_identity(meta.get("annotations") or {}),
        dag_id=labels.get(LABEL_DAG_ID),
        task_id=labels.get(LABEL_TASK_ID),
        state="running" if running else "terminal",
        remote_state=str((pod.get("status") or {}).get("phase") or ""),
        created=parse_time(meta.get("creationTimestamp")),
        finished=finished,
        marked_finished=labels.get(LABEL_FINISHED) == "true",
        url=backend._handle(pod).url,
        handle=backend._handle(pod),
        removable=not deleting,
        where=f"{meta.get('namespace')}/{meta.get('name')}",
    )


def list_jobs(backend: KubernetesBackend, dag_id: str | None = None) -> list[JobInfo]:
    """Every pod of this provider in the namespace (of ``dag_id`` only), newest first."""
    # Ours, with every label the configuration puts on its pods: two deployments sharing a namespace and
    # setting ``labels`` each see (and retire) only their own. A selector's comma-separated requirements must
    # all hold (Kubernetes "Labels and Selectors": the comma acts as a logical AND).
    selector = ",".join([f"{LABEL_MANAGED_BY}={MANAGED_BY}",
                         *(f"{k}={v}" for k, v in sorted(backend.config.labels.items()))])
    body = backend._json("listing pods", backend.core.list_namespaced_pod, backend.namespace(),
                         label_selector=selector)
    jobs = [_job(backend, pod) for pod in body.get("items") or []]
    if dag_id is not None:
        jobs = [j for j in jobs if j.dag_id == dag_id]
    jobs.sort(key=lambda j: (j.created or 0.0, j.job_id), reverse=True)
    return jobs


def remove(backend: KubernetesBackend, job: JobInfo) -> None:
    """Delete the pod (404: already gone, not an error)."""
    namespace, _, name = job.job_id.partition("/")
    backend._delete(namespace, name, None)
