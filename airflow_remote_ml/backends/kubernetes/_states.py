"""Pod → :class:`RunStatus`: every phase and container state, as pure functions of the pod's JSON.

The pod is the API's JSON (camelCase keys), as read with ``_preload_content=False`` or from a watch
event. Nothing here does I/O or reads the clock: ``now`` is passed in, so the mapping is table-tested.

Rules worth knowing (see ``docs/backends/kubernetes.md``):

* ``Pending`` is QUEUED until ``startup_timeout`` seconds after creation; after that an Unschedulable pod
  fails with the scheduler's message, any other pending pod with what it is waiting for.
* Pull errors fail at once unless the kubelet's message says the registry is only briefly unavailable
  (the same rule as the cncf-kubernetes provider's PodManager); those are bounded by ``startup_timeout``.
* A pod Airflow cancelled carries :data:`ANNOTATION_CANCELLED`; a pod being deleted without it was
  deleted by someone else and is LOST. A pod whose container ended *after* the kill was asked for is
  never reported as succeeded, whatever its exit code.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from airflow_remote_ml.core.identity import LABEL_PREFIX
from airflow_remote_ml.core.status import RunState, RunStatus

log = logging.getLogger(__name__)

JSON = dict[str, Any]

#: Set (epoch seconds as a string) by Airflow just before it deletes a pod it cancels.
ANNOTATION_CANCELLED = f"{LABEL_PREFIX}/cancelled-at"
#: Set to "true" once Airflow is done with a pod, so nothing ever reattaches to it.
LABEL_FINISHED = f"{LABEL_PREFIX}/finished"

#: Container waiting reasons that never heal by waiting.
FATAL_WAITING = {
    "InvalidImageName": "the image name is invalid",
    "ErrImageNeverPull": "the image is not on the node and imagePullPolicy is Never",
    "CreateContainerConfigError": "the container's configuration is invalid (a missing Secret, ConfigMap or key?)",
    "CreateContainerError": "the container could not be created",
    "RunContainerError": "the container could not be started",
    "PreCreateHookError": "a pre-create hook failed",
    "PreStartHookError": "the postStart hook failed",
    "PostStartHookError": "the postStart hook failed",
}
#: Pull errors: fatal unless the message shows a passing registry problem.
PULL_WAITING = ("ErrImagePull", "ImagePullBackOff")
#: Lower-case fragments of a pull error that the kubelet's retries usually overcome.
TRANSIENT_PULL_PATTERNS = (
    "pull qps exceeded", "rate limit", "too many requests", "toomanyrequests", "quota exceeded",
    "temporarily unavailable", "timeout", "account limit", "bad gateway", "service unavailable",
    "gateway timeout",
)
#: Waiting reasons of a container that is on its way.
STARTING_WAITING = ("ContainerCreating", "PodInitializing", "")
#: With restartPolicy Never these should not occur; if a pod template changes the policy they mean "retrying".
RESTARTING_WAITING = ("CrashLoopBackOff",)

_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_time(value: str | None) -> float | None:
    """Epoch seconds of a ``metav1.Time``/``MicroTime`` string (``None`` when absent or malformed)."""
    if not value:
        return None
    match = _TIME_RE.match(value.strip())
    if not match:
        return None
    stamp, fraction, zone = match.groups()
    moment = datetime.fromisoformat(stamp + ("+00:00" if zone == "Z" else zone))
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def container_status(pod: Mapping[str, Any], container: str) -> JSON:
    """The status of container ``container`` (the step), or ``{}`` before the kubelet reports one."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return dict(status)
    return {}


def condition(pod: Mapping[str, Any], kind: str) -> JSON:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def never_ran(pod: Mapping[str, Any]) -> bool:
    """Whether the pod is still Pending: no container of it has run (restartPolicy Never makes a pod whose
    container started Running, then Succeeded or Failed). Such a pod starts as soon as its cause is fixed."""
    return ((pod.get("status") or {}).get("phase") or "Pending") == "Pending"


def termination_manifest(message: str | None) -> JSON | None:
    """The runtime's manifest from a termination message, or None (a log tail, empty, or not ours)."""
    if not message or not message.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(message)
    except ValueError:
        return None
    if isinstance(value, dict) and "protocol_version" in value and "status" in value:
        return value
    return None


def cancelled_at(pod: Mapping[str, Any]) -> float | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_CANCELLED)
    try:
        return float(value) if value else None
    except ValueError:
        return 0.0  # marked, time unknown: treat every ending as after the cancel


def deletion_requested_at(pod: Mapping[str, Any]) -> float | None:
    """When the deletion was asked for: ``deletionTimestamp`` is that moment plus the grace period."""
    meta = pod.get("metadata") or {}
    when = parse_time(meta.get("deletionTimestamp"))
    if when is None:
        return None
    return when - float(meta.get("deletionGracePeriodSeconds") or 0)


def _exit_message(code: int | None, reason: str, manifest: JSON | None) -> str:
    if manifest and manifest.get("error"):
        return str(manifest["error"])
    message = f"the step exited with code {code}"
    if code == 127:
        message += " (command not found: is python3 in the image?)"
    elif code == 137:
        message += " (killed by SIGKILL)"
    elif code == 143:
        message += " (killed by SIGTERM)"
    if reason and reason not in ("Error", "Completed"):
        message = f"{reason}: {message}"
    return message


def _finished_before(term: Mapping[str, Any], moment: float | None) -> bool:
    """Whether the container ended strictly before ``moment`` (second precision: a tie is 'after')."""
    finished = parse_time(term.get("finishedAt"))
    return moment is not None and finished is not None and finished < int(moment)


def status_from_pod(
    pod: Mapping[str, Any],
    *,
    container: str = "step",
    now: float,
    startup_timeout: float = 600.0,
    cancelled: bool = False,
) -> RunStatus:
    """Map a pod to a :class:`RunStatus`.

    Args:
        pod: the pod's JSON.
        container: the name of the step's container.
        now: the current time (epoch seconds), for ``startup_timeout``.
        startup_timeout: seconds a pod may stay Pending (unscheduled, pulling, creating).
        cancelled: this process cancelled the pod (besides the annotation, which says so durably).
    """
    status = pod.get("status") or {}
    phase = status.get("phase") or ""
    meta = pod.get("metadata") or {}
    cstatus = container_status(pod, container)
    state = cstatus.get("state") or {}
    term = state.get("terminated") or {}
    waiting = state.get("waiting") or {}
    cancel_time = cancelled_at(pod)
    if cancelled and cancel_time is None:
        cancel_time = now
    deletion = deletion_requested_at(pod)
    exit_code = term.get("exitCode") if term else None
    manifest = termination_manifest(term.get("message")) if term else None

    # Airflow cancelled it: cancelled, unless the step had already finished on its own.
    if cancel_time is not None:
        if phase == "Succeeded" and _finished_before(term, cancel_time):
            return RunStatus(RunState.SUCCEEDED, phase, "", exit_code)
        if phase == "Failed" and _finished_before(term, cancel_time):
            return _failed(pod, phase, cstatus, manifest)
        if phase == "Running" and state.get("running") and not term:
            # Graceful deletion: the kubelet has sent SIGTERM and SIGKILLs at the end of the grace period
            # (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-termination). Until the
            # container has stopped, the step still runs: a cancel is only confirmed once it has.
            return RunStatus(RunState.RUNNING, "Terminating", "cancelled by Airflow; waiting for the container "
                             "to stop", exit_code)
        return RunStatus(RunState.CANCELLED, phase or "Deleting", "cancelled by Airflow", exit_code)

    # Someone else is deleting it.
    if deletion is not None:
        if phase == "Succeeded" and _finished_before(term, deletion):
            return RunStatus(RunState.SUCCEEDED, phase, "", exit_code)
        if phase == "Failed" and _finished_before(term, deletion):
            return _failed(pod, phase, cstatus, manifest)
        return RunStatus(RunState.LOST, phase or "Deleting",
                         "the pod was deleted by someone else (not by Airflow) before the step finished",
                         exit_code)

    if phase == "Succeeded":
        return RunStatus(RunState.SUCCEEDED, phase, "", 0 if exit_code is None else exit_code)
    if phase == "Failed":
        return _failed(pod, phase, cstatus, manifest)
    if phase == "Pending" or not phase:
        return _pending(pod, phase or "Pending", cstatus, now, startup_timeout, meta)
    if phase == "Running":
        if waiting.get("reason") in RESTARTING_WAITING:
            return RunStatus(RunState.RUNNING, phase, f"{waiting['reason']}: {waiting.get('message', '')}".strip())
        if term:  # the step's container ended; the pod's phase follows in a moment
            return RunStatus(RunState.RUNNING, phase, f"container terminated ({term.get('reason', '')}), "
                             "waiting for the pod's phase", exit_code)
        return RunStatus(RunState.RUNNING, phase)
    if phase == "Unknown":
        return RunStatus(RunState.RUNNING, phase, "the node stopped reporting on the pod; waiting for it to "
                         "come back or for Kubernetes to fail the pod")
    log.warning("kubernetes: unknown pod phase %r of pod %s; waiting", phase, meta.get("name"))
    return RunStatus(RunState.RUNNING, phase, f"unknown pod phase {phase!r}")


def _failed(pod: Mapping[str, Any], phase: str, cstatus: Mapping[str, Any], manifest: JSON | None) -> RunStatus:
    status = pod.get("status") or {}
    reason = status.get("reason") or ""
    message = status.get("message") or ""
    term = (cstatus.get("state") or {}).get("terminated") or {}
    code = term.get("exitCode") if term else None
    if reason == "Evicted":
        return RunStatus(RunState.FAILED, f"{phase}/Evicted", f"Evicted: {message}".rstrip(": "), code,
                         reason="Evicted")
    if reason == "DeadlineExceeded":
        deadline = (pod.get("spec") or {}).get("activeDeadlineSeconds")
        limit = f" of {deadline}s" if deadline else ""
        return RunStatus(RunState.FAILED, f"{phase}/DeadlineExceeded",
                         f"DeadlineExceeded: the pod ran longer than its activeDeadlineSeconds{limit} "
                         "(the step's timeout plus the deadline grace) and was stopped", code,
                         reason="DeadlineExceeded")
    if term.get("reason") == "OOMKilled":
        memory = (((_container_spec(pod, cstatus.get("name")) or {}).get("resources") or {})
                  .get("limits") or {}).get("memory")
        shown = f" of {memory}" if memory else ""
        # The kubelet's terminated.reason: the kernel killed a process of the container's cgroup for
        # memory. The runtime may have survived (it was the step's child that died) and recorded a generic
        # "exit code 137": this reason is the one that must lead the task's error.
        return RunStatus(RunState.FAILED, f"{phase}/OOMKilled",
                         f"OOMKilled: the step used more than its memory limit{shown}; raise compute.memory "
                         "or use a high-memory profile", code, reason="OOMKilled")
    if term:
        treason = term.get("reason") or ""
        # "Error"/"Completed" say nothing the exit code does not; StartError, ContainerStatusUnknown... do.
        return RunStatus(RunState.FAILED, f"{phase}/{treason or 'Error'}", _exit_message(code, treason, manifest),
                         code, reason="" if treason in ("", "Error", "Completed") else treason)
    waiting = (cstatus.get("state") or {}).get("waiting") or {}
    if waiting.get("reason"):
        return RunStatus(RunState.FAILED, f"{phase}/{waiting['reason']}",
                         f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": "), reason=waiting["reason"])
    detail = ": ".join(x for x in (reason, message) if x) or "the pod failed before the step's container ran"
    return RunStatus(RunState.FAILED, phase + (f"/{reason}" if reason else ""), detail, reason=reason)


def _container_spec(pod: Mapping[str, Any], name: str | None) -> JSON | None:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == name:
            return dict(c)
    return None


def _pending(pod: Mapping[str, Any], phase: str, cstatus: Mapping[str, Any], now: float, startup_timeout: float,
             meta: Mapping[str, Any]) -> RunStatus:
    created = parse_time(meta.get("creationTimestamp"))
    overdue = created is not None and now - created >= startup_timeout
    waiting = (cstatus.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason") or ""
    wmessage = waiting.get("message") or ""
    if reason in FATAL_WAITING:
        return RunStatus(RunState.FAILED, f"{phase}/{reason}",
                         f"{reason}: {wmessage or FATAL_WAITING[reason]}", reason=reason)
    if reason in PULL_WAITING:
        transient = any(p in wmessage.lower() for p in TRANSIENT_PULL_PATTERNS)
        if not transient or overdue:
            return RunStatus(RunState.FAILED, f"{phase}/{reason}",
                             f"{reason}: {wmessage or 'the image cannot be pulled'}; check the image name and tag, "
                             "and that imagePullSecrets give access to the registry", reason=reason)
        return RunStatus(RunState.QUEUED, f"{phase}/{reason}", f"{reason}: {wmessage} (retrying)")
    scheduled = condition(pod, "PodScheduled")
    if scheduled.get("status") == "False":
        why = scheduled.get("message") or scheduled.get("reason") or "not scheduled"
        if overdue:
            return RunStatus(RunState.FAILED, f"{phase}/{scheduled.get('reason') or 'Unschedulable'}",
                             f"Unschedulable: no node took the pod within startup_timeout={startup_timeout:g}s: "
                             f"{why}; check the profile's nodeSelector/tolerations and that the node pool can "
                             "scale up", None, reason=scheduled.get("reason") or "Unschedulable")
        return RunStatus(RunState.QUEUED, f"{phase}/{scheduled.get('reason') or 'Unschedulable'}",
                         f"waiting for a node: {why}")
    if overdue:
        what = reason or ("scheduling" if not scheduled else "the kubelet")
        return RunStatus(RunState.FAILED, f"{phase}/{reason or 'Pending'}",
                         f"the pod did not start within startup_timeout={startup_timeout:g}s (still waiting for "
                         f"{what}{': ' + wmessage if wmessage else ''})", reason=reason or "StartupTimeout")
    if reason and reason not in STARTING_WAITING:
        log.warning("kubernetes: unknown waiting reason %r of pod %s; waiting", reason, meta.get("name"))
    return RunStatus(RunState.QUEUED, f"{phase}/{reason}" if reason else phase,
                     f"{reason}: {wmessage}".strip(": ") if reason else "")


def status_after_deletion(
    last_pod: Mapping[str, Any] | None,
    *,
    container: str = "step",
    cancelled: bool = False,
    manifest: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
    now: float,
) -> RunStatus:
    """The status of a pod that no longer exists.

    ``last_pod`` is its last known state (a watch's DELETED event carries it); ``manifest`` the result
    manifest the runtime wrote, if readable. Only a finished-and-recorded step counts as succeeded.
    """
    if last_pod is not None:
        status = status_from_pod(last_pod, container=container, now=now, cancelled=cancelled,
                                 startup_timeout=float("inf"))
        if status.is_terminal:
            return status
    if cancelled:
        return RunStatus(RunState.CANCELLED, "Deleted", "cancelled by Airflow")
    if manifest and (identity is None or manifest.get("identity") == identity):
        code = manifest.get("exit_code")
        if manifest.get("status") == "succeeded":
            return RunStatus(RunState.SUCCEEDED, "Deleted", "", 0 if code is None else code)
        return RunStatus(RunState.FAILED, "Deleted", str(manifest.get("error") or _exit_message(code, "", None)), code)
    return RunStatus(RunState.LOST, "Deleted", "the pod was deleted (not by Airflow) before its result was recorded")
