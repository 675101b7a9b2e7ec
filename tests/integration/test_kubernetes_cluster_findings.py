"""The findings of issue 10 (a real v1.36 cluster), each reproduced against the API test double.

Every test here failed on the backend as it was when the issue was filed; the double's matching rule
(content negotiation, status codes on the deferred path, admission, RBAC, OOM, Pending pods) is what
makes it fail the way the cluster did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.backends.kubernetes import KubernetesBackend
from airflow_remote_ml.core import RunState
from airflow_remote_ml.core.errors import BackendAPIError, TransientBackendError
from airflow_remote_ml.core.wait import await_completion, failure_error, wait_for_completion
from tests.fakes.kubernetes_api import FakeKubernetes
from tests.integration.kubernetes_support import CLAIM, SLEEP, make_backend, request

pytestmark = pytest.mark.timeout(120)

TALK = ["python3", "-c", "print('one', flush=True); print('two', flush=True)"]


# -- 1. pods/log is negotiated: every sync step failed with 406 ---------------------------------------------

@pytest.fixture
def k8s() -> Iterator[FakeKubernetes]:
    with FakeKubernetes(pull_backoff=0.2) as fake:
        yield fake


@pytest.fixture
def root(tmp_path: Path, k8s: FakeKubernetes) -> str:
    path = tmp_path / "artifacts"
    k8s.register_volume_claim(CLAIM, path)
    return str(path)


@pytest.fixture
def backend(k8s: FakeKubernetes, root: str) -> Iterator[KubernetesBackend]:
    b = make_backend(k8s, root)
    yield b
    b.close()



def test_a_sync_step_streams_its_log_through_the_negotiated_endpoint(k8s, backend, root):
    handle = backend.submit(request(root, command=TALK))
    lines: list[str] = []
    outcome = wait_for_completion(backend, handle, on_line=lines.append, deadline=time.monotonic() + 60)
    assert outcome.status.is_successful, outcome.status
    assert [x for x in lines if x in ("one", "two")] == ["one", "two"]
    assert all(r.status != 406 for r in k8s.requests)


def test_a_deferred_step_streams_its_log_through_the_negotiated_endpoint(k8s, backend, root):
    handle = backend.submit(request(root, command=TALK))
    lines: list[str] = []

    async def main() -> Any:
        try:
            return await await_completion(backend, handle, on_line=lines.append, deadline=time.monotonic() + 60)
        finally:
            await backend.aclose()

    outcome = asyncio.run(main())
    assert outcome.status.is_successful, outcome.status
    assert [x for x in lines if x in ("one", "two")] == ["one", "two"]
    assert all(r.status != 406 for r in k8s.requests)


# -- 2. the deferred path checks HTTP status codes --------------------------------------------------------


def test_deferred_log_read_refused_is_an_error_not_log_text(k8s, backend, root):
    handle = backend.submit(request(root, command=TALK))
    k8s.wait_for_pod(handle.data["pod"], "Succeeded")
    k8s.fail_next(403, method="GET", kind="pods/{name}/log")

    async def main() -> Any:
        try:
            await backend.apoll(handle)
            return await backend.aread_logs(handle, None)
        finally:
            await backend.aclose()

    with pytest.raises(BackendAPIError) as info:
        asyncio.run(main())
    assert info.value.status_code == 403 and not isinstance(info.value, TransientBackendError)


def test_deferred_log_read_429_is_retried_after_retry_after(k8s, backend, root):
    handle = backend.submit(request(root, command=TALK))
    k8s.wait_for_pod(handle.data["pod"], "Succeeded")
    k8s.fail_next(429, method="GET", kind="pods/{name}/log", retry_after=1)

    async def main() -> Any:
        try:
            await backend.apoll(handle)
            return await backend.aread_logs(handle, None)
        finally:
            await backend.aclose()

    chunk = asyncio.run(main())
    assert [x for x in chunk.lines if x in ("one", "two")] == ["one", "two"]
    assert k8s.count(method="GET", kind="pods/{name}/log") == 2


@pytest.mark.parametrize("code", [403, 500, 503])
def test_deferred_pod_read_error_is_never_pod_gone(k8s, backend, root, code):
    handle = backend.submit(request(root, command=SLEEP))
    k8s.wait_for_pod(handle.data["pod"], "Running")
    b = make_backend(k8s, root, api_retries=0)
    k8s.fail_next(code, count=5, method="GET", kind="pods/{name}")

    async def main() -> None:
        try:
            await b.acancel(handle)  # reads the pod first: an error must not read as "already gone"
        finally:
            await b.aclose()

    expected = TransientBackendError if code >= 500 else BackendAPIError
    with pytest.raises(expected) as info:
        asyncio.run(main())
    assert info.value.status_code == code
    k8s.clear_faults()
    pod = k8s.get_pod(handle.data["pod"])
    assert pod is not None and not pod["metadata"].get("deletionTimestamp")  # nothing was done blindly
    backend.cancel(handle)


# -- 3. OOMKilled reaches the user -------------------------------------------------------------------------


def test_oom_kill_of_the_steps_child_is_reported_as_oomkilled_not_exit_137(k8s, backend, root):
    # As on the cluster: a 64Mi limit, a step that allocates 200 MB. The kernel kills the step (the
    # runtime's child), the runtime survives and records only that its child got SIGKILL (exit 137).
    req = request(root, command=["python3", "-c", "b = b'x' * (200 * 2**20); import time; time.sleep(60)"],
                  resources={"memory": "64Mi"})
    handle = backend.submit(req)
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 60)
    status = outcome.status
    assert (status.state, status.reason, status.exit_code) == (RunState.FAILED, "OOMKilled", 137)
    assert "64Mi" in status.message
    manifest = backend.read_manifest(req.manifest_uri)
    assert manifest is not None and "exit 137" in manifest["error"]  # the runtime lived to write it
    error = str(failure_error(backend, handle, status, outcome.tail))
    assert error.splitlines()[0].endswith(status.message) and "OOMKilled" in error.splitlines()[0]
    assert "the step reported: " + manifest["error"] in error


@pytest.mark.parametrize(("setup", "reason"), [
    ("evict", "Evicted"),
    ("pull", "ErrImagePull"),
    ("never", "ErrImageNeverPull"),
    ("secret", "CreateContainerConfigError"),
])
def test_each_platform_failure_sets_its_reason(k8s, root, setup, reason):
    b = make_backend(k8s, root, startup_timeout=3)
    spec: dict[str, Any] = {"command": SLEEP}
    if setup == "pull":
        k8s.register_image("registry.example/nope:1", pull_error="rpc error: code = NotFound desc = not found")
        spec["image"] = "registry.example/nope:1"
    elif setup == "never":
        spec["backend_options"] = {"kubernetes": {"image_pull_policy": "Never"}}
        spec["image"] = "not-on-the-node:1"
    elif setup == "secret":
        spec["secrets"] = {"TOKEN": "absent-secret/token"}
    try:
        handle = b.submit(request(root, **spec))
        if setup == "evict":
            k8s.wait_for_pod(handle.data["pod"], lambda p: "started" in k8s.pod_log(handle.data["pod"]) if p else False)
            k8s.evict(handle.data["pod"])
        outcome = wait_for_completion(b, handle, deadline=time.monotonic() + 60)
    finally:
        b.close()
    assert outcome.status.state is RunState.FAILED
    assert outcome.status.reason.startswith(reason), outcome.status


def test_unschedulable_sets_its_reason(root):
    with FakeKubernetes() as fake:
        fake.register_volume_claim(CLAIM, root)
        fake.block_scheduling()
        b = make_backend(fake, root, startup_timeout=1)
        try:
            handle = b.submit(request(root, command=["true"]))
            outcome = wait_for_completion(b, handle, deadline=time.monotonic() + 60)
        finally:
            b.close()
    assert (outcome.status.state, outcome.status.reason) == (RunState.FAILED, "Unschedulable")


# -- 4. a pod that never started does not outlive its task ---------------------------------------------------


@pytest.mark.parametrize("policy", ["on_success", "never"])
def test_a_pod_that_never_started_is_deleted_when_its_task_gives_up(k8s, root, policy):
    b = make_backend(k8s, root, delete_policy=policy)
    try:
        req = request(root, command=["python3", "-c", "print('ran anyway')"],
                      secrets={"TOKEN": "late-secret/token"})
        handle = b.submit(req)
        outcome = wait_for_completion(b, handle, deadline=time.monotonic() + 60)
        assert outcome.status.reason == "CreateContainerConfigError"
        b.mark_finished(handle)
        b.cleanup(handle, outcome.status)
    finally:
        b.close()
    k8s.wait_for_pod(handle.data["pod"], "Deleted")
    # On the cluster, creating the Secret now made the old pod run the step after its task had failed.
    k8s.add_secret("late-secret", {"token": "t"})
    assert b.find(req.identity) is None and k8s.list_pods() == []


def test_cancel_deletes_a_pending_pod_whose_status_already_reads_failed(k8s, backend, root):
    handle = backend.submit(request(root, command=["true"], image="not-here:1",
                                    backend_options={"kubernetes": {"image_pull_policy": "Never"}}))
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 60)
    assert outcome.status.reason == "ErrImageNeverPull"
    backend.cancel(handle)  # the lifecycle cancels on every failure after submit
    k8s.wait_for_pod(handle.data["pod"], "Deleted")


def test_a_failed_pod_that_ran_is_kept_for_debugging(k8s, backend, root):
    handle = backend.submit(request(root, command=["false"]))
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 60)
    backend.cancel(handle)
    backend.mark_finished(handle)
    backend.cleanup(handle, outcome.status)
    assert k8s.get_pod(handle.data["pod"]) is not None


# -- 6. messages ---------------------------------------------------------------------------------------------


def test_a_missing_step_service_account_says_it_does_not_exist(k8s, root):
    b = make_backend(k8s, root, service_account_name="remote-ml-steps")
    try:
        with pytest.raises(BackendAPIError) as info:
            b.submit(request(root, command=["true"]))
    finally:
        b.close()
    text = str(info.value)
    assert info.value.status_code == 403 and not isinstance(info.value, TransientBackendError)
    assert 'serviceaccount "remote-ml-steps" not found' in text and "does not exist" in text
    assert "needs the Role" not in text
    assert k8s.list_pods() == []
    assert k8s.get_pod  # and it was not created for us:
    assert k8s._call(lambda: k8s.store.peek("serviceaccounts", "default", "remote-ml-steps")) is None


def test_a_missing_namespace_is_refused_not_created(k8s, root):
    b = make_backend(k8s, root, namespace="ml-steps")
    try:
        with pytest.raises(BackendAPIError) as info:
            b.submit(request(root, command=["true"]))
    finally:
        b.close()
    assert info.value.status_code == 404 and 'namespaces "ml-steps" not found' in str(info.value)
    assert k8s._call(lambda: k8s.store.peek("namespaces", "", "ml-steps")) is None


def test_the_exit_code_error_names_the_namespace(k8s, backend, root):
    handle = backend.submit(request(root, command=["python3", "-c", "import sys; sys.exit(3)"]))
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 60)
    assert outcome.status.exit_code == 3
    error = failure_error(backend, handle, outcome.status, outcome.tail)
    assert f"default/{handle.data['pod']}" in str(error)


def test_the_schedulers_reason_is_logged_when_it_changes(root, caplog):
    with FakeKubernetes() as fake:
        fake.register_volume_claim(CLAIM, root)
        fake.block_scheduling("0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")
        b = make_backend(fake, root)
        lines: list[str] = []
        try:
            handle = b.submit(request(root, command=["true"]))
            fake.wait_for_pod(handle.data["pod"], lambda p: bool(p and p["status"].get("conditions")))
            caplog.set_level(logging.INFO, logger="airflow_remote_ml.backends.kubernetes")
            status = b.wait(handle, 0.5)
            assert status.state is RunState.QUEUED
            fake.block_scheduling("0/3 nodes are available: 3 node(s) had untolerated taint {gpu: true}.")
            fake.wait_for_pod(handle.data["pod"], lambda p: bool(p) and "taint" in json_dump(p))
            b.wait(handle, 0.5)
            fake.unblock_scheduling()
            outcome = wait_for_completion(b, handle, on_line=lines.append, deadline=time.monotonic() + 60)
        finally:
            b.close()
    assert outcome.status.is_successful
    said = [r.getMessage() for r in caplog.records if "is pending: waiting for a node" in r.getMessage()]
    assert len(said) == 2, said
    assert "Insufficient nvidia.com/gpu" in said[0] and "untolerated taint" in said[1]


def json_dump(obj: Any) -> str:
    import json

    return json.dumps(obj)


# -- 7. smaller --------------------------------------------------------------------------------------------


def test_a_successful_step_deletes_its_pod_once(k8s, backend, root):
    handle = backend.submit(request(root, command=["true"]))
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 60)
    assert outcome.status.is_successful
    backend.fetch_result(handle)
    backend.mark_finished(handle)
    backend.cleanup(handle, outcome.status)
    k8s.wait_for_pod(handle.data["pod"], "Deleted")
    assert k8s.count(method="DELETE") == 1


def test_the_shared_session_is_closed_when_the_trigger_loop_ends_while_it_lingers(k8s, root):
    from airflow_remote_ml.backends.kubernetes import _watch as shared_watch

    b = make_backend(k8s, root, session_linger=600)  # the loop ends long before the linger would
    handle = b.submit(request(root, command=["true"]))

    async def main() -> Any:
        await await_completion(b, handle, deadline=time.monotonic() + 60)
        sessions = shared_watch.sessions()
        await b.aclose()  # releases the session; it lingers for the next trigger
        assert not sessions[0].closed
        return sessions[0]

    session = asyncio.run(main())
    b.close()
    assert session.closed and session.api.rest_client.pool_manager.closed


# -- 9. performance: requests per sync step ---------------------------------------------------------------


def test_a_sync_step_costs_at_most_six_api_requests(k8s, backend, root):
    # Issue 10 measured 11 on a real cluster (create 1, get 2, list 1, watch 2, log 3, delete 2).
    req = request(root, command=["python3", "-c", "print('hi')"])
    k8s.reset_counts()
    handle = backend.submit(req)
    lines: list[str] = []
    outcome = wait_for_completion(backend, handle, on_line=lines.append, deadline=time.monotonic() + 60)
    assert outcome.status.is_successful and "hi" in lines
    backend.fetch_result(handle)
    backend.mark_finished(handle)
    backend.cleanup(handle, outcome.status)
    k8s.wait_for_pod(handle.data["pod"], "Deleted")
    kinds = [(r.method, r.kind, r.watch) for r in k8s.requests]
    assert len(kinds) <= 6, kinds
    assert kinds.count(("POST", "pods", False)) == 1 and kinds.count(("DELETE", "pods/{name}", False)) == 1
    assert kinds.count(("GET", "pods", True)) == 1  # one watch, resumed from the create's resourceVersion


def test_close_ends_the_workers_watch_and_log_stream(k8s, root):
    b = make_backend(k8s, root)
    handle = b.submit(request(root, command=SLEEP))
    k8s.wait_for_pod(handle.data["pod"], lambda p: bool(p) and "started" in k8s.pod_log(handle.data["pod"]))
    assert b.wait(handle, 0.2).state is RunState.RUNNING
    deadline = time.monotonic() + 30
    while "started" not in b.read_logs(handle, None).lines:  # from the log stream, once it has sent it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert k8s.active_watches == 1 and k8s.count(method="GET", kind="pods/{name}/log") == 1
    b.close()
    deadline = time.monotonic() + 30
    while k8s.active_watches or any(t.name.startswith("remote-ml-") for t in __import__("threading").enumerate()):
        assert time.monotonic() < deadline, "the watch or log stream outlived close()"
        time.sleep(0.01)
    backend = make_backend(k8s, root)
    backend.cancel(handle)
    backend.close()
