"""Table tests: every pod phase and container state the kubernetes backend maps, with no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_remote_ml.backends.kubernetes._states import (
    ANNOTATION_CANCELLED,
    parse_time,
    status_after_deletion,
    status_from_pod,
    termination_manifest,
)
from airflow_remote_ml.core.status import RunState

CREATED = "2024-05-01T12:00:00Z"
T0 = parse_time(CREATED) or 0.0
MANIFEST_OK = json.dumps({"protocol_version": 1, "status": "succeeded", "exit_code": 0, "outputs": {}})
MANIFEST_FAILED = json.dumps({"protocol_version": 1, "status": "failed", "exit_code": 3,
                              "error": "declared output 'model' not produced by the step"})


def pod(phase: str | None, *, waiting: tuple[str, str] | None = None, terminated: dict[str, Any] | None = None,
        running: bool = False, reason: str | None = None, message: str | None = None,
        scheduled: tuple[str, str, str] | None = None, annotations: dict[str, str] | None = None,
        deletion: tuple[str, int] | None = None, memory_limit: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": "ns", "creationTimestamp": CREATED, "uid": "u1"}
    if annotations:
        meta["annotations"] = annotations
    if deletion:
        meta["deletionTimestamp"], meta["deletionGracePeriodSeconds"] = deletion
    status: dict[str, Any] = {}
    if phase:
        status["phase"] = phase
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    if scheduled:
        status["conditions"] = [{"type": "PodScheduled", "status": scheduled[0], "reason": scheduled[1],
                                 "message": scheduled[2]}]
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = {"reason": waiting[0], "message": waiting[1]}
    if terminated is not None:
        state["terminated"] = terminated
    if running:
        state["running"] = {"startedAt": CREATED}
    if state:
        status["containerStatuses"] = [{"name": "step", "state": state, "ready": running, "restartCount": 0}]
    container: dict[str, Any] = {"name": "step", "image": "python:3.11"}
    if memory_limit:
        container["resources"] = {"limits": {"memory": memory_limit}}
    return {"metadata": meta, "spec": {"containers": [container], "activeDeadlineSeconds": 3660},
            "status": status}


def term(code: int, reason: str = "Error", message: str = "", finished: str = "2024-05-01T12:05:00Z") -> dict:
    return {"exitCode": code, "reason": reason, "message": message, "finishedAt": finished}


UNSCHEDULABLE = ("False", "Unschedulable", "0/3 nodes are available: 3 node(s) had untolerated taint {gpu: true}.")

# (case, pod, seconds since creation, expected state, expected message fragment)
CASES = [
    ("no status yet", pod(None), 1, RunState.QUEUED, ""),
    ("pending, nothing reported", pod("Pending"), 1, RunState.QUEUED, ""),
    ("pending, creating", pod("Pending", waiting=("ContainerCreating", "")), 1, RunState.QUEUED, ""),
    ("pending, initializing", pod("Pending", waiting=("PodInitializing", "")), 1, RunState.QUEUED, ""),
    ("unschedulable within startup timeout", pod("Pending", scheduled=UNSCHEDULABLE), 10, RunState.QUEUED,
     "waiting for a node: 0/3 nodes"),
    ("unschedulable past startup timeout", pod("Pending", scheduled=UNSCHEDULABLE), 700, RunState.FAILED,
     "Unschedulable: no node took the pod within startup_timeout=600s: 0/3 nodes are available"),
    ("stuck creating past startup timeout", pod("Pending", waiting=("ContainerCreating", ""),
                                                scheduled=("True", "", "")), 700, RunState.FAILED,
     "did not start within startup_timeout=600s (still waiting for ContainerCreating)"),
    ("image pull error", pod("Pending", waiting=("ErrImagePull", "rpc error: not found")), 1, RunState.FAILED,
     "ErrImagePull: rpc error: not found"),
    ("image pull back-off", pod("Pending", waiting=("ImagePullBackOff", 'Back-off pulling image "x"')), 1,
     RunState.FAILED, 'ImagePullBackOff: Back-off pulling image "x"'),
    ("registry rate limit is retried", pod("Pending", waiting=("ErrImagePull", "429 Too Many Requests")), 1,
     RunState.QUEUED, "(retrying)"),
    ("registry rate limit past startup timeout", pod("Pending", waiting=("ErrImagePull", "429 Too Many Requests")),
     700, RunState.FAILED, "ErrImagePull"),
    ("invalid image name", pod("Pending", waiting=("InvalidImageName", "bad ref")), 1, RunState.FAILED,
     "InvalidImageName: bad ref"),
    ("never pull", pod("Pending", waiting=("ErrImageNeverPull", "")), 1, RunState.FAILED, "ErrImageNeverPull"),
    ("missing secret", pod("Pending", waiting=("CreateContainerConfigError", 'secret "db" not found')), 1,
     RunState.FAILED, 'CreateContainerConfigError: secret "db" not found'),
    ("create container error", pod("Pending", waiting=("CreateContainerError", "no such file")), 1,
     RunState.FAILED, "CreateContainerError"),
    ("run container error", pod("Pending", waiting=("RunContainerError", "exec failed")), 1, RunState.FAILED,
     "RunContainerError"),
    ("unknown waiting reason keeps waiting", pod("Pending", waiting=("SomethingNew", "")), 1, RunState.QUEUED,
     "SomethingNew"),
    ("running", pod("Running", running=True), 1, RunState.RUNNING, ""),
    ("running, container just ended", pod("Running", terminated=term(0, "Completed")), 1, RunState.RUNNING,
     "container terminated"),
    ("crash loop (template changed restartPolicy)", pod("Running", waiting=("CrashLoopBackOff", "back-off")), 1,
     RunState.RUNNING, "CrashLoopBackOff"),
    ("succeeded", pod("Succeeded", terminated=term(0, "Completed", MANIFEST_OK)), 1, RunState.SUCCEEDED, ""),
    ("failed with exit code", pod("Failed", terminated=term(7)), 1, RunState.FAILED,
     "the step exited with code 7"),
    ("failed, reason from the runtime manifest", pod("Failed", terminated=term(3, "Error", MANIFEST_FAILED)), 1,
     RunState.FAILED, "declared output 'model' not produced"),
    ("failed, command not found", pod("Failed", terminated=term(127)), 1, RunState.FAILED, "command not found"),
    ("failed, container could not run", pod("Failed", terminated=term(128, "ContainerCannotRun")), 1,
     RunState.FAILED, "ContainerCannotRun: the step exited with code 128"),
    ("OOMKilled", pod("Failed", terminated=term(137, "OOMKilled"), memory_limit="512Mi"), 1, RunState.FAILED,
     "OOMKilled: the step used more than its memory limit of 512Mi"),
    ("evicted", pod("Failed", reason="Evicted", message="The node was low on resource: memory."), 1,
     RunState.FAILED, "Evicted: The node was low on resource: memory."),
    ("deadline exceeded", pod("Failed", reason="DeadlineExceeded", message="Pod was active too long",
                              terminated=term(143)), 1, RunState.FAILED,
     "DeadlineExceeded: the pod ran longer than its activeDeadlineSeconds of 3660s"),
    ("failed before the container ran", pod("Failed", reason="UnexpectedAdmissionError", message="no gpu"), 1,
     RunState.FAILED, "UnexpectedAdmissionError: no gpu"),
    ("unknown phase (node lost)", pod("Unknown"), 1, RunState.RUNNING, "stopped reporting"),
    ("unrecognised phase keeps waiting", pod("Hibernating"), 1, RunState.RUNNING, "unknown pod phase"),
    # Graceful deletion: the container still runs until it exits or the grace period's SIGKILL, so the
    # cancel is not confirmed yet (a step that traps SIGTERM would otherwise outlive a "cancelled" pod).
    ("cancelled by Airflow, terminating", pod("Running", running=True,
                                             annotations={ANNOTATION_CANCELLED: str(T0 + 60)},
                                             deletion=("2024-05-01T12:01:30Z", 30)), 1, RunState.RUNNING,
     "cancelled by Airflow; waiting for the container to stop"),
    ("cancelled, killed step exited 0 after the cancel: never success",
     pod("Succeeded", terminated=term(0, "Completed", finished="2024-05-01T12:01:05Z"),
         annotations={ANNOTATION_CANCELLED: str(T0 + 60)}), 1, RunState.CANCELLED, "cancelled"),
    ("cancel arrived after the step had succeeded",
     pod("Succeeded", terminated=term(0, "Completed", finished="2024-05-01T12:00:30Z"),
         annotations={ANNOTATION_CANCELLED: str(T0 + 60)}), 1, RunState.SUCCEEDED, ""),
    ("deleted by someone else while running", pod("Running", running=True,
                                                  deletion=("2024-05-01T12:01:30Z", 30)), 1, RunState.LOST,
     "deleted by someone else"),
    ("deleted by someone else, exit 0 after the kill: never success",
     pod("Succeeded", terminated=term(0, "Completed", finished="2024-05-01T12:01:10Z"),
         deletion=("2024-05-01T12:01:30Z", 30)), 1, RunState.LOST, "deleted by someone else"),
    ("deleted after it had succeeded", pod("Succeeded", terminated=term(0, "Completed",
                                                                       finished="2024-05-01T12:00:30Z"),
                                           deletion=("2024-05-01T12:01:00Z", 0)), 1, RunState.SUCCEEDED, ""),
    ("deleted after it had failed", pod("Failed", terminated=term(2, finished="2024-05-01T12:00:30Z"),
                                        deletion=("2024-05-01T12:01:00Z", 0)), 1, RunState.FAILED, "code 2"),
]


@pytest.mark.parametrize(("case", "pod_json", "age", "state", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_pod_state_mapping(case: str, pod_json: dict, age: float, state: RunState, fragment: str) -> None:
    status = status_from_pod(pod_json, now=T0 + age, startup_timeout=600)
    assert status.state is state, (case, status)
    assert fragment in status.message, (case, status.message)


def test_exit_code_and_remote_state_are_kept() -> None:
    status = status_from_pod(pod("Failed", terminated=term(7)), now=T0)
    assert (status.exit_code, status.remote_state) == (7, "Failed/Error")
    oom = status_from_pod(pod("Failed", terminated=term(137, "OOMKilled")), now=T0)
    assert (oom.exit_code, oom.remote_state) == (137, "Failed/OOMKilled")


def test_cancelled_in_this_process_without_the_annotation_yet() -> None:
    status = status_from_pod(pod("Running", running=True), now=T0 + 5, cancelled=True)
    assert status.state is RunState.RUNNING and status.remote_state == "Terminating"
    stopped = status_from_pod(pod("Running", terminated=term(143, "Error")), now=T0 + 6, cancelled=True)
    assert stopped.state is RunState.CANCELLED


def test_unknown_phase_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    status_from_pod(pod("Weird"), now=T0)
    assert "unknown pod phase 'Weird'" in caplog.text


AFTER = T0 + 3600
DELETION_CASES = [
    ("last seen succeeded", pod("Succeeded", terminated=term(0, "Completed")), False, None, RunState.SUCCEEDED),
    ("last seen running, cancelled here", pod("Running", running=True), True, None, RunState.CANCELLED),
    ("last seen running, not ours to delete", pod("Running", running=True), False, None, RunState.LOST),
    ("never seen, cancelled here", None, True, None, RunState.CANCELLED),
    ("never seen, manifest says succeeded", None, False,
     {"status": "succeeded", "exit_code": 0, "identity": {"x": 1}}, RunState.SUCCEEDED),
    ("never seen, manifest says failed", None, False,
     {"status": "failed", "exit_code": 4, "error": "boom", "identity": {"x": 1}}, RunState.FAILED),
    ("never seen, manifest of another identity", None, False,
     {"status": "succeeded", "exit_code": 0, "identity": {"x": 2}}, RunState.LOST),
    ("never seen, no manifest", None, False, None, RunState.LOST),
]


@pytest.mark.parametrize(("case", "last", "cancelled", "manifest", "state"), DELETION_CASES,
                         ids=[c[0] for c in DELETION_CASES])
def test_status_after_deletion(case: str, last: dict | None, cancelled: bool, manifest: dict | None,
                               state: RunState) -> None:
    status = status_after_deletion(last, cancelled=cancelled, manifest=manifest, identity={"x": 1}, now=AFTER)
    assert status.state is state, (case, status)


@pytest.mark.parametrize(("message", "is_manifest"), [
    (MANIFEST_OK, True), ("", False), (None, False), ("Traceback (most recent call last):\n", False),
    ('{"some": "json"}', False), ("{not json", False),
])
def test_termination_manifest_recognises_only_the_runtime_manifest(message: str | None, is_manifest: bool) -> None:
    assert (termination_manifest(message) is not None) is is_manifest


def test_parse_time_handles_metav1_and_micro_time() -> None:
    assert parse_time("2024-05-01T12:00:00Z") == T0
    assert parse_time("2024-05-01T12:00:00.250000Z") == pytest.approx(T0 + 0.25)
    assert parse_time("2024-05-01T14:00:00+02:00") == T0
    assert parse_time(None) is None and parse_time("yesterday") is None
