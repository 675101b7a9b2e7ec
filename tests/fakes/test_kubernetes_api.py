"""The Kubernetes API test double, driven end to end by the official clients.

Every test talks to the fake through ``kubernetes`` (or ``kubernetes_asyncio``) exactly as a backend
would, and checks what a real cluster answers: status codes, Status bodies, watch semantics, pod
state transitions, logs and Events.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.fakes.kubernetes_api import (
    DEADLINE_MESSAGE,
    PATH_MAP_ENV,
    TERMINATION_ENV,
    FakeKubernetes,
    FakeNode,
    ImageBehavior,
)

pytestmark = pytest.mark.timeout(60)

NS = "default"


@pytest.fixture
def k8s() -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as fake:
        yield fake


@pytest.fixture
def v1(k8s: FakeKubernetes) -> client.CoreV1Api:
    return k8s.core_v1()


def pod_body(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": spec.pop("image", "python:3.11-slim"), "command": command}
    container.update(spec.pop("container", {}))
    labels = spec.pop("labels", {"app": "test"})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def watch_until_terminal(v1: client.CoreV1Api, name: str, timeout: int = 30) -> tuple[list[str], client.V1Pod]:
    """Watch one pod with the client's Watch helper until it is Succeeded or Failed."""
    w = watch.Watch()
    phases: list[str] = []
    for event in w.stream(v1.list_namespaced_pod, NS, field_selector=f"metadata.name={name}",
                          timeout_seconds=timeout):
        pod = event["object"]
        phases.append(pod.status.phase)
        if pod.status.phase in ("Succeeded", "Failed"):
            w.stop()
            return phases, pod
    raise AssertionError(f"watch ended before {name} finished: {phases}")


def status_of(exc: ApiException) -> dict[str, Any]:
    return json.loads(exc.body)


# --------------------------------------------------------------------------------- basic pod life


def test_pod_runs_command_to_success_with_log_and_termination_message(k8s: FakeKubernetes,
                                                                      v1: client.CoreV1Api) -> None:
    code = (f"import os; print('hi'); open(os.environ['{TERMINATION_ENV}'], 'w')"
            ".write('{\"ok\": true}')")
    created = v1.create_namespaced_pod(NS, pod_body("hello", ["python3", "-c", code]))
    assert created.metadata.uid and int(created.metadata.resource_version) > 0
    assert created.metadata.creation_timestamp is not None
    assert created.status.phase == "Pending"

    phases, pod = watch_until_terminal(v1, "hello")

    assert phases[-1] == "Succeeded"
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason, term.message) == (0, "Completed", '{"ok": true}')
    assert term.started_at is not None and term.finished_at is not None
    assert {c.type: c.status for c in pod.status.conditions}["PodScheduled"] == "True"
    resp = v1.read_namespaced_pod_log("hello", NS, _preload_content=False)
    assert resp.data.decode() == "hi\n"
    reasons = [e.reason for e in v1.list_namespaced_event(NS, field_selector="involvedObject.name=hello").items]
    assert reasons == ["Scheduled", "Pulling", "Pulled", "Created", "Started"]


def test_failed_container_reports_error_and_fallback_log_message(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    code = "import sys; print('boom happened'); sys.exit(3)"
    body = pod_body("fails", ["python", "-c", code], container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    v1.create_namespaced_pod(NS, body)

    _, pod = watch_until_terminal(v1, "fails")

    term = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Failed"
    assert (term.exit_code, term.reason, term.message) == (3, "Error", "boom happened\n")
    ready = {c.type: c for c in pod.status.conditions}["Ready"]
    assert (ready.status, ready.reason) == ("False", "PodCompleted")


def test_duplicate_create_is_409_already_exists(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("dup", ["sleep", "30"]))
    with pytest.raises(ApiException) as info:
        v1.create_namespaced_pod(NS, pod_body("dup", ["sleep", "30"]))
    assert info.value.status == 409
    assert status_of(info.value) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "dup" already exists', "reason": "AlreadyExists",
        "details": {"name": "dup", "kind": "pods"}, "code": 409,
    }


def test_missing_pod_is_404_not_found_status(v1: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as info:
        v1.read_namespaced_pod("nope", NS)
    assert info.value.status == 404
    body = status_of(info.value)
    assert (body["reason"], body["message"], body["details"]) == (
        "NotFound", 'pods "nope" not found', {"name": "nope", "kind": "pods"})


def test_generate_name_and_invalid_label_value(v1: client.CoreV1Api) -> None:
    body = pod_body("", ["true"])
    body["metadata"] = {"generateName": "step-"}
    pod = v1.create_namespaced_pod(NS, body)
    assert pod.metadata.name.startswith("step-") and len(pod.metadata.name) == len("step-") + 5

    with pytest.raises(ApiException) as info:
        v1.create_namespaced_pod(NS, pod_body("bad", ["true"], labels={"run_id": "manual__2024-01-01T00:00:00+00:00"}))
    assert info.value.status == 422
    assert status_of(info.value)["reason"] == "Invalid"
    assert "metadata.labels: Invalid value" in status_of(info.value)["message"]


# ------------------------------------------------------------------------------ list and select


def test_label_and_field_selectors_and_paging(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    for i in range(5):
        labels = {"app": "ml", "step": f"s{i}"} if i < 4 else {"app": "other"}
        v1.create_namespaced_pod(NS, pod_body(f"p{i}", ["sleep", "30"], labels=labels))

    names = lambda pods: [p.metadata.name for p in pods.items]  # noqa: E731
    assert names(v1.list_namespaced_pod(NS, label_selector="app=ml")) == ["p0", "p1", "p2", "p3"]
    assert names(v1.list_namespaced_pod(NS, label_selector="app=ml,step in (s1,s3)")) == ["p1", "p3"]
    assert names(v1.list_namespaced_pod(NS, label_selector="app!=ml")) == ["p4"]
    assert names(v1.list_namespaced_pod(NS, label_selector="!step")) == ["p4"]
    assert names(v1.list_namespaced_pod(NS, label_selector="step,step notin (s0)")) == ["p1", "p2", "p3"]
    assert names(v1.list_namespaced_pod(NS, field_selector="metadata.name=p2")) == ["p2"]
    k8s.wait_for_pod("p0", "Running")
    running = v1.list_namespaced_pod(NS, field_selector="status.phase=Running,metadata.name=p0")
    assert names(running) == ["p0"]

    first = v1.list_namespaced_pod(NS, limit=2)
    assert names(first) == ["p0", "p1"]
    assert first.metadata._continue and first.metadata.remaining_item_count == 3
    second = v1.list_namespaced_pod(NS, limit=2, _continue=first.metadata._continue)
    third = v1.list_namespaced_pod(NS, limit=2, _continue=second.metadata._continue)
    assert names(second) == ["p2", "p3"] and names(third) == ["p4"]
    assert third.metadata._continue is None
    assert int(first.metadata.resource_version) > 0

    with pytest.raises(ApiException) as info:
        v1.list_namespaced_pod(NS, field_selector="spec.bogus=1")
    assert info.value.status == 400


# -------------------------------------------------------------------------------------- watches


def test_watch_from_expired_resource_version_gets_410(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("w1", ["true"]))
    old_rv = v1.list_namespaced_pod(NS).metadata.resource_version
    k8s.wait_for_pod("w1", "Succeeded")
    k8s.compact()

    resp = v1.list_namespaced_pod(NS, watch=True, resource_version=old_rv, _preload_content=False)
    lines = [json.loads(line) for line in resp.data.decode().splitlines()]
    assert len(lines) == 1 and lines[0]["type"] == "ERROR"
    status = lines[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith(f"too old resource version: {old_rv} (")

    with pytest.raises(ApiException) as info:
        for _ in watch.Watch().stream(v1.list_namespaced_pod, NS, resource_version=old_rv, timeout_seconds=5):
            pass
    assert info.value.status == 410


def test_watch_resumes_from_resource_version_and_timeout_ends_stream(k8s: FakeKubernetes,
                                                                      v1: client.CoreV1Api) -> None:
    rv = v1.list_namespaced_pod(NS).metadata.resource_version
    v1.create_namespaced_pod(NS, pod_body("w2", ["true"]))
    k8s.wait_for_pod("w2", "Succeeded")

    started = time.monotonic()
    events = [(e["type"], e["object"].status.phase)
              for e in watch.Watch().stream(v1.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=1)]

    assert events[0] == ("ADDED", "Pending")
    assert events[-1] == ("MODIFIED", "Succeeded")
    assert time.monotonic() - started >= 1  # the server ended the stream at timeoutSeconds


def test_drop_watches_ends_streams_and_bookmarks_carry_resource_version(k8s: FakeKubernetes,
                                                                         v1: client.CoreV1Api) -> None:
    resp = v1.list_namespaced_pod(NS, watch=True, allow_watch_bookmarks=True, timeout_seconds=30,
                                  _preload_content=False)
    deadline = time.monotonic() + 5
    while k8s.active_watches == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    k8s.send_bookmarks()
    assert k8s.drop_watches() == 1
    lines = [json.loads(x) for x in resp.data.decode().splitlines()]
    assert [x["type"] for x in lines] == ["BOOKMARK"]
    assert int(lines[0]["object"]["metadata"]["resourceVersion"]) == k8s.resource_version


# --------------------------------------------------------------------------- delete and deadline


def test_delete_with_grace_period_kills_process_and_removes_pod(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("sleeper", ["sleep", "300"]))
    k8s.wait_for_pod("sleeper", "Running")
    pid = k8s.container_pid("sleeper")
    assert pid is not None

    answered = v1.delete_namespaced_pod("sleeper", NS, grace_period_seconds=5)

    assert answered.metadata.deletion_timestamp is not None
    assert answered.metadata.deletion_grace_period_seconds == 5
    k8s.wait_for_pod("sleeper", "Deleted")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "Killing" in [e["reason"] for e in k8s.events("sleeper")]


def test_delete_body_options_and_watch_sees_deleted(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("victim", ["sleep", "300"]))
    k8s.wait_for_pod("victim", "Running")
    rv = v1.read_namespaced_pod("victim", NS).metadata.resource_version

    v1.delete_namespaced_pod("victim", NS, body=client.V1DeleteOptions(grace_period_seconds=0))

    types = [e["type"] for e in watch.Watch().stream(v1.list_namespaced_pod, NS, resource_version=rv,
                                                     timeout_seconds=1)]
    assert types[-1] == "DELETED"
    with pytest.raises(ApiException) as info:
        v1.delete_namespaced_pod("victim", NS)
    assert info.value.status == 404


def test_active_deadline_fails_pod_with_deadline_exceeded(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("slow", ["sleep", "300"], activeDeadlineSeconds=1))

    _, pod = watch_until_terminal(v1, "slow")

    assert (pod.status.phase, pod.status.reason, pod.status.message) == ("Failed", "DeadlineExceeded",
                                                                        DEADLINE_MESSAGE)
    assert pod.status.container_statuses[0].state.terminated.exit_code == 143
    assert "DeadlineExceeded" in [e["reason"] for e in k8s.events("slow")]


# ----------------------------------------------------------------------------------------- logs


def test_log_of_waiting_container_is_400_with_kubelet_message(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    k8s.register_image("slow-pull:1", pull_seconds=30)
    v1.create_namespaced_pod(NS, pod_body("waiting", ["true"], image="slow-pull:1"))
    k8s.wait_for_pod("waiting", lambda p: bool(p and p["status"].get("containerStatuses")))

    with pytest.raises(ApiException) as info:
        v1.read_namespaced_pod_log("waiting", NS)

    assert info.value.status == 400
    assert status_of(info.value)["message"] == (
        'container "main" in pod "waiting" is waiting to start: ContainerCreating')


def test_log_options_follow_timestamps_tail_and_limit(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    code = "import time\nfor i in range(4):\n    print(f'line{i}', flush=True); time.sleep(0.2)"
    v1.create_namespaced_pod(NS, pod_body("chatty", ["python3", "-c", code]))
    k8s.wait_for_pod("chatty", "Running")

    followed = [line for line in watch.Watch().stream(v1.read_namespaced_pod_log, "chatty", NS)]
    assert followed == ["line0", "line1", "line2", "line3"]  # the stream ended with the container

    stamped = v1.read_namespaced_pod_log("chatty", NS, timestamps=True, tail_lines=2,
                                         _preload_content=False).data.decode().splitlines()
    assert [s.split(" ", 1)[1] for s in stamped] == ["line2", "line3"]
    stamp = stamped[0].split(" ", 1)[0]
    assert len(stamp) == len("2024-01-01T00:00:00.000000000Z") and stamp.endswith("Z")
    limited = v1.read_namespaced_pod_log("chatty", NS, limit_bytes=7, _preload_content=False).data.decode()
    assert limited == "line0\nl"


# --------------------------------------------------------------------------- env, volumes, images


def test_secret_env_resolution_and_missing_secret(k8s: FakeKubernetes, v1: client.CoreV1Api, tmp_path: Path) -> None:
    shared = tmp_path / "artifacts"
    k8s.register_volume_claim("artifacts", shared)
    k8s.add_secret("creds", {"token": "s3cr3t"})
    # "/mnt/out" in the code is rewritten to the claim's host directory before the process starts.
    code = f"import os; open('/mnt/out/result.txt','w').write(os.environ['TOKEN']); print(os.environ['{PATH_MAP_ENV}'])"
    body = pod_body("env", ["python3", "-c", code], container={
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
        "volumeMounts": [{"name": "data", "mountPath": "/mnt/out"}]},
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "artifacts"}}])
    v1.create_namespaced_pod(NS, body)
    k8s.wait_for_pod("env", "Succeeded")
    assert (shared / "result.txt").read_text() == "s3cr3t"
    assert json.loads(k8s.pod_log("env"))["/mnt/out"] == str(shared)

    missing = pod_body("nosecret", ["true"], container={
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]})
    v1.create_namespaced_pod(NS, missing)
    pod = k8s.wait_for_pod("nosecret", lambda p: p is not None and "CreateContainerConfigError" in json.dumps(p["status"]))
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting == {"reason": "CreateContainerConfigError", "message": 'secret "absent" not found'}


def test_image_pull_error_backs_off_with_real_reasons(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    k8s.register_image("nope:1", pull_error='rpc error: code = NotFound desc = failed to pull and unpack image '
                                           '"docker.io/library/nope:1": not found')
    v1.create_namespaced_pod(NS, pod_body("pull", ["true"], image="nope:1"))

    pod = k8s.wait_for_pod("pull", lambda p: p is not None and "ImagePullBackOff" in json.dumps(p["status"]))

    assert pod["status"]["phase"] == "Pending"
    assert pod["status"]["containerStatuses"][0]["state"]["waiting"] == {
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "nope:1"'}
    messages = [e["message"] for e in k8s.events("pull")]
    assert "Error: ErrImagePull" in messages and "Error: ImagePullBackOff" in messages
    with pytest.raises(ApiException) as info:
        v1.read_namespaced_pod_log("pull", NS)
    assert status_of(info.value)["message"].endswith("is waiting to start: trying and failing to pull image")


def test_untolerated_taint_is_unschedulable_with_scheduler_message() -> None:
    nodes = [FakeNode(f"gpu-{i}", labels={"pool": "gpu"}, taints=[{"key": "gpu", "value": "true",
                                                                   "effect": "NoSchedule"}]) for i in range(3)]
    with FakeKubernetes(nodes=nodes) as k8s:
        v1 = k8s.core_v1()
        v1.create_namespaced_pod(NS, pod_body("plain", ["true"]))
        pod = k8s.wait_for_pod("plain", lambda p: bool(p and p["status"].get("conditions")))
        cond = pod["status"]["conditions"][0]
        assert (cond["type"], cond["status"], cond["reason"]) == ("PodScheduled", "False", "Unschedulable")
        assert cond["message"] == ("0/3 nodes are available: 3 node(s) had untolerated taint {gpu: true}. "
                                   "preemption: 0/3 nodes are available: 3 Preemption is not helpful for "
                                   "scheduling.")
        assert [e["reason"] for e in k8s.events("plain")] == ["FailedScheduling"]

        tolerant = pod_body("tolerant", ["true"], tolerations=[{"key": "gpu", "operator": "Exists",
                                                                "effect": "NoSchedule"}],
                            nodeSelector={"pool": "gpu"})
        v1.create_namespaced_pod(NS, tolerant)
        assert k8s.wait_for_pod("tolerant", "Succeeded")["spec"]["nodeName"].startswith("gpu-")


def test_oom_and_eviction_report_kubelet_reasons(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("hog", ["sleep", "300"]))
    v1.create_namespaced_pod(NS, pod_body("evictee", ["sleep", "300"]))
    k8s.wait_for_pod("hog", "Running")
    k8s.wait_for_pod("evictee", "Running")

    k8s.oom_kill("hog")
    k8s.evict("evictee")

    hog = k8s.wait_for_pod("hog", "Failed")
    term = hog["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["reason"], term["exitCode"]) == ("OOMKilled", 137)
    evicted = k8s.wait_for_pod("evictee", "Failed")
    assert evicted["status"]["reason"] == "Evicted"
    assert evicted["status"]["message"].startswith("The node was low on resource: memory.")
    assert "Evicted" in [e["reason"] for e in k8s.events("evictee")]


def test_simulated_image_runs_until_finished(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    k8s.register_image("bench/*", ImageBehavior(simulate=True, duration=None, output="working\n",
                                                termination_message="{}"))
    v1.create_namespaced_pod(NS, pod_body("sim", ["ignored"], image="bench/step:1"))
    k8s.wait_for_pod("sim", "Running")
    assert k8s.finish_container("sim", exit_code=0)
    pod = k8s.wait_for_pod("sim", "Succeeded")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "{}"
    assert k8s.pod_log("sim") == "working\n"


# ------------------------------------------------------------------------ patch, faults, counting


def test_merge_and_strategic_patch_labels_and_conflict(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("patched", ["sleep", "30"]))
    stale_rv = v1.read_namespaced_pod("patched", NS).metadata.resource_version

    v1.patch_namespaced_pod("patched", NS, {"metadata": {"labels": {"done": "true"}}})  # strategic merge
    merged = v1.patch_namespaced_pod("patched", NS, {"metadata": {"annotations": {"a": "1"}, "labels": {"app": None}}},
                                     _content_type="application/merge-patch+json")
    assert merged.metadata.labels == {"done": "true"}
    assert merged.metadata.annotations == {"a": "1"}

    with pytest.raises(ApiException) as info:
        v1.patch_namespaced_pod("patched", NS, {"metadata": {"resourceVersion": stale_rv, "labels": {"x": "y"}}},
                                _content_type="application/merge-patch+json")
    assert info.value.status == 409 and status_of(info.value)["reason"] == "Conflict"


def test_fault_injection_429_retry_after_and_503(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    cfg = k8s.configuration()
    cfg.retries = False  # urllib3 otherwise retries a 429 that carries Retry-After by itself
    raw = client.CoreV1Api(client.ApiClient(cfg))
    k8s.fail_next(429, retry_after=2, method="GET", kind="pods/{name}")
    k8s.fail_next(503, method="POST", kind="pods")
    with pytest.raises(ApiException) as info:
        raw.read_namespaced_pod("any", NS)
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "2"
    assert status_of(info.value)["details"] == {"retryAfterSeconds": 2}
    with pytest.raises(ApiException) as info:
        v1.create_namespaced_pod(NS, pod_body("later", ["true"]))
    assert info.value.status == 503 and status_of(info.value)["reason"] == "ServiceUnavailable"
    v1.create_namespaced_pod(NS, pod_body("later", ["true"]))  # the rule was used up

    assert k8s.count(method="GET", kind="pods/{name}") == 1
    assert k8s.count(method="POST", kind="pods") == 2


def test_default_client_retries_429_transparently(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    k8s.fail_next(429, retry_after=0, method="GET", kind="pods/{name}")
    with pytest.raises(ApiException) as info:
        v1.read_namespaced_pod("any", NS)
    assert info.value.status == 404  # the retry reached the server and got the real answer
    assert [r.status for r in k8s.requests] == [429, 404]


def test_wrong_token_is_401(k8s: FakeKubernetes) -> None:
    cfg = k8s.configuration()
    cfg.api_key = {"BearerToken": "Bearer wrong"}
    with pytest.raises(ApiException) as info:
        client.CoreV1Api(client.ApiClient(cfg)).list_namespaced_pod(NS)
    assert info.value.status == 401


def test_kubeconfig_file_works_with_load_kube_config(k8s: FakeKubernetes) -> None:
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(k8s.kubeconfig_path))
    pods = client.CoreV1Api(api).list_namespaced_pod(NS)
    assert pods.items == [] and sys.executable


# -------------------------------------------------------------------------------------- asyncio


@pytest.mark.asyncio
async def test_kubernetes_asyncio_watch_sees_pod_complete(k8s: FakeKubernetes) -> None:
    from kubernetes_asyncio import client as aclient
    from kubernetes_asyncio import watch as awatch

    async with aclient.ApiClient(k8s.async_configuration()) as api:
        core = aclient.CoreV1Api(api)
        body = pod_body("async", ["python3", "-c", "print('async hi')"])
        await core.create_namespaced_pod(NS, body)  # type: ignore[arg-type]
        phases = []
        async with awatch.Watch() as w:
            async for event in w.stream(core.list_namespaced_pod, NS, field_selector="metadata.name=async",
                                        timeout_seconds=20):
                phases.append(event["object"].status.phase)
                if event["object"].status.phase == "Succeeded":
                    break
        log = await core.read_namespaced_pod_log("async", NS)
    assert phases[-1] == "Succeeded"
    assert "async hi" in log


# ------------------------------------------------------------------- restarts, init, watch edges


def test_on_failure_restarts_with_crash_loop_back_off_and_previous_log() -> None:
    with FakeKubernetes(crashloop_backoff=0.1) as k8s:
        v1 = k8s.core_v1()
        v1.create_namespaced_pod(NS, pod_body("flaky", ["python3", "-c", "print('attempt'); raise SystemExit(2)"],
                                              restartPolicy="OnFailure"))
        pod = k8s.wait_for_pod("flaky", lambda p: p is not None and p["status"].get("containerStatuses", [{}])[0]
                               .get("restartCount", 0) >= 1)
        status = pod["status"]["containerStatuses"][0]
        assert status["lastState"]["terminated"]["exitCode"] == 2
        assert pod["status"]["phase"] == "Running"
        previous = v1.read_namespaced_pod_log("flaky", NS, previous=True, _preload_content=False)
        assert previous.data.decode() == "attempt\n"
        assert "BackOff" in [e["reason"] for e in k8s.events("flaky")]


def test_init_container_runs_before_main_container(k8s: FakeKubernetes, v1: client.CoreV1Api, tmp_path: Path) -> None:
    k8s.register_volume_claim("work", tmp_path)
    mount = {"volumeMounts": [{"name": "w", "mountPath": "/work"}]}
    body = pod_body("ordered", ["python3", "-c", "print(open('/work/init.txt').read())"], container=mount,
                    volumes=[{"name": "w", "persistentVolumeClaim": {"claimName": "work"}}],
                    initContainers=[{"name": "prep", "image": "python:3.11-slim", **mount,
                                     "command": ["python3", "-c", "open('/work/init.txt','w').write('prepared')"]}])
    v1.create_namespaced_pod(NS, body)

    pod = k8s.wait_for_pod("ordered", "Succeeded")

    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert k8s.pod_log("ordered", "main") == "prepared\n"


def test_label_selector_watch_sees_deleted_when_label_is_patched_away(k8s: FakeKubernetes,
                                                                        v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("tagged", ["sleep", "30"], labels={"live": "yes"}))
    rv = v1.list_namespaced_pod(NS).metadata.resource_version
    v1.patch_namespaced_pod("tagged", NS, {"metadata": {"labels": {"live": None}}},
                            _content_type="application/merge-patch+json")

    types = [e["type"] for e in watch.Watch().stream(v1.list_namespaced_pod, NS, label_selector="live=yes",
                                                     resource_version=rv, timeout_seconds=1)]

    assert types[-1] == "DELETED"  # it left the selection, as the watch cache reports it
    assert v1.read_namespaced_pod("tagged", NS).metadata.labels is None  # empty maps are omitted, as in Go


def test_default_termination_path_in_args_is_rewritten(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    code = "open('/dev/termination-log', 'w').write('written to the default path')"
    v1.create_namespaced_pod(NS, pod_body("default-path", ["python3", "-c", code]))

    pod = k8s.wait_for_pod("default-path", "Succeeded")

    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["message"] == "written to the default path"


def test_insufficient_gpu_is_unschedulable_until_a_gpu_node_appears(k8s: FakeKubernetes,
                                                                    v1: client.CoreV1Api) -> None:
    body = pod_body("train", ["true"], container={"resources": {"limits": {"nvidia.com/gpu": "1"}}})
    v1.create_namespaced_pod(NS, body)
    pod = k8s.wait_for_pod("train", lambda p: bool(p and p["status"].get("conditions")))
    assert pod["status"]["conditions"][0]["message"] == (
        "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available: "
        "1 No preemption victims found for incoming pod.")

    k8s.add_node(FakeNode("gpu-node", allocatable={"cpu": "8", "memory": "64Gi", "pods": "110",
                                                   "nvidia.com/gpu": "1"}))

    assert k8s.wait_for_pod("train", "Succeeded")["spec"]["nodeName"] == "gpu-node"


def test_abrupt_watch_drop_resets_the_connection(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    import urllib3

    resp = v1.list_namespaced_pod(NS, watch=True, timeout_seconds=30, _preload_content=False)
    deadline = time.monotonic() + 5
    while k8s.active_watches == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    assert k8s.drop_watches(abrupt=True) == 1

    with pytest.raises(urllib3.exceptions.ProtocolError):
        resp.read()


# ------------------------------------------------------------- negotiation, admission, RBAC (issue 10)


def _raw(k8s: FakeKubernetes, path: str, accept: str | None, token: str | None = None) -> tuple[int, str, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(k8s.url + path)
    req.add_header("Authorization", f"Bearer {token or k8s.token}")
    if accept is not None:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


NOT_ACCEPTABLE = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": "only the following media types are accepted: application/json, application/yaml, "
                             "application/vnd.kubernetes.protobuf", "reason": "NotAcceptable", "code": 406}


@pytest.mark.parametrize("path", [
    "/api/v1/namespaces/default/pods",
    "/api/v1/namespaces/default/pods/talker",
    "/api/v1/namespaces/default/pods/talker/log",
    "/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1",
    "/api/v1/namespaces",
])
def test_every_endpoint_negotiates_the_media_type_before_answering(k8s: FakeKubernetes, v1: client.CoreV1Api,
                                                                    path: str) -> None:
    v1.create_namespaced_pod(NS, pod_body("talker", ["python3", "-c", "print('hello')"]))
    k8s.wait_for_pod("talker", "Succeeded")
    code, ctype, body = _raw(k8s, path, "text/plain")
    assert (code, ctype) == (406, "application/json")
    assert json.loads(body) == NOT_ACCEPTABLE


def test_pod_log_is_text_plain_for_the_accept_kubectl_sends(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("talker", ["python3", "-c", "print('hello')"]))
    k8s.wait_for_pod("talker", "Succeeded")
    for accept in ("application/json, */*", "*/*", "application/json", None, "text/plain;q=1, */*;q=0.5"):
        code, ctype, body = _raw(k8s, "/api/v1/namespaces/default/pods/talker/log", accept)
        assert (code, body) == (200, "hello\n"), accept
        assert ctype.startswith("text/plain")
    assert _raw(k8s, "/api/v1/namespaces/default/pods/talker/log", "application/json;q=0, text/plain")[0] == 406
    code, ctype, body = _raw(k8s, "/api/v1/namespaces/default/pods/talker", "application/yaml")
    assert code == 200 and ctype == "application/yaml" and "name: talker" in body


def test_a_missing_service_account_is_refused_by_admission_never_created(k8s: FakeKubernetes,
                                                                        v1: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as info:
        v1.create_namespaced_pod(NS, pod_body("orphan", ["true"], serviceAccountName="nobody"))
    assert info.value.status == 403
    assert status_of(info.value)["message"] == ('pods "orphan" is forbidden: error looking up service account '
                                                'default/nobody: serviceaccount "nobody" not found')
    assert k8s.get_pod("orphan") is None
    k8s.add_service_account("nobody")
    v1.create_namespaced_pod(NS, pod_body("orphan", ["true"], serviceAccountName="nobody"))
    assert k8s.wait_for_pod("orphan", "Succeeded")


def test_a_missing_namespace_is_refused_not_created(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as info:
        v1.create_namespaced_pod("nowhere", pod_body("p", ["true"]))
    assert info.value.status == 404
    assert status_of(info.value)["message"] == 'namespaces "nowhere" not found'
    assert [n.metadata.name for n in v1.list_namespace().items if n.metadata.name == "nowhere"] == []


def test_rbac_is_evaluated_from_roles_and_bindings(k8s: FakeKubernetes) -> None:
    k8s.create_namespace("steps")
    k8s.create_namespace("airflow")
    k8s.add_service_account("worker", namespace="airflow")
    k8s.apply([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "reader"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "worker", "namespace": "airflow"}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"}},
    ], namespace="steps")
    token = k8s.service_account_token("worker", namespace="airflow")
    assert _raw(k8s, "/api/v1/namespaces/steps/pods", None, token)[0] == 200
    # The binding is in "steps": nothing in "default".
    code, _, body = _raw(k8s, "/api/v1/namespaces/default/pods", None, token)
    assert code == 403 and json.loads(body)["message"] == (
        'pods is forbidden: User "system:serviceaccount:airflow:worker" cannot list resource "pods" in API group '
        '"" in the namespace "default"')
    # A rule for "pods" does not cover the pods/log subresource; nor "get" the "watch" verb.
    code, _, body = _raw(k8s, "/api/v1/namespaces/steps/pods/x/log", None, token)
    assert code == 403 and json.loads(body)["message"] == (
        'pods "x" is forbidden: User "system:serviceaccount:airflow:worker" cannot get resource "pods/log" in API '
        'group "" in the namespace "steps"')
    assert _raw(k8s, "/api/v1/namespaces/steps/pods?watch=true", None, token)[0] == 403
    # An unknown token is not anyone.
    assert _raw(k8s, "/api/v1/namespaces/steps/pods", None, "not-a-token")[0] == 401


PARENT_AND_HOG = (
    "import subprocess, sys\n"
    "child = subprocess.run([sys.executable, '-c', \"b = b'x' * (200 * 2**20); import time; time.sleep(60)\"])\n"
    "print('parent survived, child', child.returncode, flush=True)\n"
    "sys.exit(3)\n"
)


def test_the_memory_limit_oom_kills_only_the_biggest_process(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("hog", ["python3", "-c", PARENT_AND_HOG],
                                          container={"resources": {"limits": {"memory": "64Mi"}}}))
    pod = k8s.wait_for_pod("hog", "Failed")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    # The child died of SIGKILL; the parent lived on, said so, and chose its own exit code.
    assert "parent survived, child -9" in k8s.pod_log("hog")
    assert (term["reason"], term["exitCode"]) == ("OOMKilled", 3)


def test_oom_kill_hook_kills_the_biggest_process_not_the_group(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod_body("hog", ["python3", "-c", PARENT_AND_HOG]))
    k8s.wait_for_pod("hog", "Running")
    main = k8s.container_pid("hog")
    deadline = time.monotonic() + 30
    while "child" not in _children_of(main) and time.monotonic() < deadline:  # wait for the child to be big
        time.sleep(0.05)
    killed = k8s.oom_kill("hog")
    assert killed is not None and killed != main
    pod = k8s.wait_for_pod("hog", "Failed")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["reason"], term["exitCode"]) == ("OOMKilled", 3)
    assert "parent survived, child -9" in k8s.pod_log("hog")


def _children_of(pid: int | None) -> str:
    """'child' once a child of ``pid`` holds more than 100 MB resident."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        if ppid == pid and rss > 100_000:
            return "child"
    return ""


def test_a_pending_pod_starts_once_its_missing_secret_is_created(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    # As the kubelet does: CreateContainerConfigError is retried on every sync, the pod stays Pending and
    # starts as soon as the Secret exists (issue 10: the step ran six seconds after the Secret appeared).
    env = [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "later", "key": "t"}}}]
    v1.create_namespaced_pod(NS, pod_body("waiter", ["python3", "-c", "import os; print(os.environ['T'])"],
                                          container={"env": env}))
    pod = k8s.wait_for_pod("waiter", lambda p: bool(p) and "CreateContainerConfigError" in json.dumps(p["status"]))
    assert pod["status"]["phase"] == "Pending"
    k8s.add_secret("later", {"t": "now-it-runs"})
    k8s.wait_for_pod("waiter", "Succeeded")
    assert k8s.pod_log("waiter") == "now-it-runs\n"


def test_an_unschedulable_pod_stays_pending_until_the_cluster_can_take_it(k8s: FakeKubernetes,
                                                                          v1: client.CoreV1Api) -> None:
    k8s.block_scheduling()
    v1.create_namespaced_pod(NS, pod_body("later", ["true"]))
    pod = k8s.wait_for_pod("later", lambda p: bool(p and p["status"].get("conditions")))
    assert pod["status"]["phase"] == "Pending"
    assert pod["status"]["conditions"][0]["reason"] == "Unschedulable"
    k8s.unblock_scheduling()
    k8s.wait_for_pod("later", "Succeeded")


# ------------------------------------------------------------------------ fault knobs (fault contract)


def test_a_late_answer_takes_effect_before_it_arrives(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    import urllib3

    k8s.answer_late(3, method="POST", kind="pods")
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        v1.create_namespaced_pod(NS, pod_body("slow", ["true"]), _request_timeout=1)
    assert k8s.get_pod("slow") is not None  # it exists although the client never heard so
    with pytest.raises(ApiException) as info:
        v1.create_namespaced_pod(NS, pod_body("slow", ["true"]))
    assert info.value.status == 409
    assert [p["metadata"]["name"] for p in k8s.created_pods] == ["slow"]


def test_a_lost_answer_takes_effect_and_closes_the_connection(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    import urllib3

    k8s.lose_answer(method="POST", kind="pods")
    with pytest.raises(urllib3.exceptions.HTTPError):
        v1.create_namespaced_pod(NS, pod_body("lost", ["true"]))
    assert k8s.get_pod("lost") is not None


def test_an_outage_answers_503_to_everything_then_ends(k8s: FakeKubernetes, v1: client.CoreV1Api) -> None:
    k8s.outage(1.0)
    with pytest.raises(ApiException) as info:
        v1.list_namespaced_pod(NS)
    assert info.value.status == 503 and status_of(info.value)["reason"] == "ServiceUnavailable"
    deadline = time.monotonic() + 30
    while True:  # it ends on its own (polled, not slept over)
        try:
            v1.list_namespaced_pod(NS)
            break
        except ApiException:
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize(("rule", "verb", "resource", "name", "allowed"), [
    ({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}, "get", "pods", "p", True),
    ({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}, "get", "pods/log", "p", False),
    ({"apiGroups": [""], "resources": ["*/log"], "verbs": ["get"]}, "get", "pods/log", "p", True),
    ({"apiGroups": [""], "resources": ["*"], "verbs": ["*"]}, "watch", "pods/log", "p", True),
    ({"apiGroups": [""], "resources": ["pods/*"], "verbs": ["get"]}, "get", "pods/log", "p", False),
    ({"apiGroups": ["apps"], "resources": ["pods"], "verbs": ["get"]}, "get", "pods", "p", False),
    ({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], "resourceNames": ["a"]}, "get", "pods", "b", False),
    ({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], "resourceNames": ["a"]}, "get", "pods", "a", True),
])
def test_rbac_rule_matching_follows_evaluation_helpers(rule: dict[str, Any], verb: str, resource: str, name: str,
                                                       allowed: bool) -> None:
    from tests.fakes.kubernetes_api._rbac import Attributes, rule_allows

    attrs = Attributes("system:serviceaccount:a:b", (), verb, resource, "ns", name)
    assert rule_allows(rule, attrs) is allowed


@pytest.mark.parametrize(("accept", "chosen"), [
    (None, "application/json"), ("", "application/json"), ("*/*", "application/json"),
    ("application/yaml", "application/yaml"), ("text/plain, application/json;q=0.5", "application/json"),
    ("application/json;stream=watch", "application/json"), ("application/*", "application/json"),
])
def test_media_type_negotiation(accept: str | None, chosen: str) -> None:
    from tests.fakes.kubernetes_api._meta import negotiate_media_type

    assert negotiate_media_type(accept) == chosen
