"""The kubernetes backend against the Kubernetes API test double: failure reasons, watches, marks, retries.

Each test drives the real ``kubernetes``/``kubernetes_asyncio`` clients over HTTP and breaks things the
way a cluster does (pull errors, taints, OOM, eviction, someone else's delete, dropped watches, 410s,
429s) through the fake's hooks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.backends.kubernetes import KubernetesBackend
from airflow_remote_ml.backends.kubernetes import _watch as shared_watch
from airflow_remote_ml.backends.kubernetes._states import ANNOTATION_CANCELLED, LABEL_FINISHED
from airflow_remote_ml.core import RunState, StepIdentity, StepRequest
from airflow_remote_ml.core.errors import TransientBackendError
from airflow_remote_ml.core.wait import await_completion, failure_error, wait_for_completion
from tests.fakes.kubernetes_api import FakeKubernetes, FakeNode, ImageBehavior
from tests.integration.kubernetes_support import CLAIM, SLEEP, make_backend, request

pytestmark = pytest.mark.timeout(120)



async def until(condition: Any, timeout: float = 30.0) -> None:
    """Wait for ``condition()`` to hold (polled; a generous bound, never a fixed sleep before an assert)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        await asyncio.sleep(0.01)

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



def run(backend: KubernetesBackend, req: StepRequest, timeout: float = 60):
    backend.validate(req)
    handle = backend.submit(req)
    lines: list[str] = []
    outcome = wait_for_completion(backend, handle, on_line=lines.append, deadline=time.monotonic() + timeout)
    assert not outcome.timed_out, outcome
    return handle, outcome, lines


# -- failure reasons ---------------------------------------------------------------------------------------


def test_image_pull_error_fails_fast_with_the_kubelet_reason(k8s, backend, root):
    k8s.register_image("registry.example/nope:1", pull_error="rpc error: code = NotFound desc = not found")
    handle, outcome, _ = run(backend, request(root, image="registry.example/nope:1", command=["true"]))
    assert outcome.status.state is RunState.FAILED
    assert outcome.status.message.startswith(("ErrImagePull", "ImagePullBackOff"))
    assert "image" in outcome.status.message


def test_unschedulable_pod_fails_after_startup_timeout_with_the_scheduler_message(k8s, root):
    gpu_only = [FakeNode("gpu-1", labels={"pool": "gpu"},
                         taints=[{"key": "gpu", "value": "true", "effect": "NoSchedule"}])]
    with FakeKubernetes(nodes=gpu_only) as fake:
        fake.register_volume_claim(CLAIM, root)
        b = make_backend(fake, root, startup_timeout=2)
        try:
            handle, outcome, _ = run(b, request(root, command=["true"]))
        finally:
            b.close()
    assert outcome.status.state is RunState.FAILED
    assert "Unschedulable" in outcome.status.message
    assert "untolerated taint {gpu: true}" in outcome.status.message


def test_gpu_profile_lands_on_the_tainted_pool(root):
    nodes = [FakeNode("cpu-1", labels={"pool": "default"}),
             FakeNode("gpu-1", labels={"pool": "gpu"}, taints=[{"key": "nvidia.com/gpu", "value": "present",
                                                                 "effect": "NoSchedule"}],
                      allocatable={"cpu": "8", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"})]
    profiles = {"gpu": {"node_selector": {"pool": "gpu"}, "gpu": 1,
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}
    with FakeKubernetes(nodes=nodes) as fake:
        fake.register_volume_claim(CLAIM, root)
        b = make_backend(fake, root, profiles=profiles)
        try:
            handle, outcome, _ = run(b, request(root, command=["true"], resources={"profile": "gpu"}))
            pod = fake.get_pod(handle.data["pod"])
        finally:
            b.close()
    assert outcome.status.is_successful, outcome
    assert pod["spec"]["nodeName"] == "gpu-1"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_oom_killed_names_the_memory_limit(k8s, backend, root):
    req = request(root, command=SLEEP, resources={"memory": "256Mi"})
    backend.validate(req)
    handle = backend.submit(req)
    k8s.wait_for_pod(handle.data["pod"], "Running")
    k8s.oom_kill(handle.data["pod"])
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 30)
    assert outcome.status.state is RunState.FAILED
    assert outcome.status.message.startswith("OOMKilled") and "256Mi" in outcome.status.message
    assert outcome.status.exit_code == 137


def test_eviction_fails_with_the_kubelet_message_and_log_tail(k8s, backend, root):
    req = request(root, command=SLEEP)
    handle = backend.submit(req)
    # Evict once the step has printed (not after a fixed sleep: on a loaded machine it may not have yet).
    k8s.wait_for_pod(handle.data["pod"], lambda p: bool(p) and "started" in k8s.pod_log(handle.data["pod"]))
    k8s.evict(handle.data["pod"])
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 30)
    assert outcome.status.state is RunState.FAILED
    assert outcome.status.message.startswith("Evicted: The node was low on resource: memory")
    error = failure_error(backend, handle, outcome.status, outcome.tail)
    assert "started" in error.log_tail


def test_deadline_exceeded_when_the_step_outlives_its_hard_deadline(k8s, backend, root):
    # A step that ignores the runtime's timeout (grace 0 makes the deadline the timeout itself).
    b = make_backend(k8s, root, deadline_grace_seconds=0)
    try:
        req = request(root, command=["python3", "-c", "import signal, time\n"
                                     "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(300)"], timeout=1)
        handle, outcome, _ = run(b, req)
    finally:
        b.close()
    assert outcome.status.state is RunState.FAILED
    assert outcome.status.message.startswith(("DeadlineExceeded", "the step ran longer than its timeout"))


def test_pod_deleted_by_someone_else_is_lost_not_waited_for(k8s, backend, root):
    handle = backend.submit(request(root, command=SLEEP))
    k8s.wait_for_pod(handle.data["pod"], "Running")
    k8s.delete_pod(handle.data["pod"], grace_seconds=0)
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 30)
    assert outcome.status.state is RunState.LOST
    assert "deleted" in outcome.status.message


def test_missing_secret_is_create_container_config_error(k8s, backend, root):
    req = request(root, command=["true"], secrets={"TOKEN": "absent-secret/token"})
    handle, outcome, _ = run(backend, req)
    assert outcome.status.state is RunState.FAILED
    assert outcome.status.message == 'CreateContainerConfigError: secret "absent-secret" not found'


def test_secret_reaches_the_step_through_secret_key_ref(k8s, backend, root):
    k8s.add_secret("db-creds", {"password": "s3cr3t"})
    req = request(root, secrets={"DB_PASSWORD": "db-creds/password"}, outputs=["out"],
                  command=["python3", "-c", "import os; open(os.environ['REMOTE_ML_OUTPUT_OUT'], 'w')"
                           ".write(os.environ['DB_PASSWORD'])"])
    handle, outcome, _ = run(backend, req)
    assert outcome.status.is_successful, outcome
    pod_env = k8s.get_pod(handle.data["pod"])["spec"]["containers"][0]["env"]
    assert {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db-creds", "key": "password"}}} in pod_env
    assert Path(backend.fetch_result(handle).outputs["out"]).read_text() == "s3cr3t"


# -- results -----------------------------------------------------------------------------------------------


def test_result_comes_from_the_termination_message_even_without_the_manifest_file(k8s, backend, root):
    req = request(root, command=["python3", "-c", "print('{\"acc\": 0.9}')"])
    handle, outcome, _ = run(backend, req)
    assert outcome.status.is_successful
    Path(req.manifest_uri).unlink()  # the artifact store is not readable here: the pod still tells
    assert backend.fetch_result(handle).metrics == {"acc": 0.9}


def test_failure_reason_comes_from_the_runtime_manifest(k8s, backend, root):
    req = request(root, command=["python3", "-c", "pass"], outputs=["model"])
    handle, outcome, _ = run(backend, req)
    assert outcome.status.state is RunState.FAILED
    assert "'model'" in outcome.status.message and "not produced" in outcome.status.message


# -- cancel, marks, cleanup, reattach ---------------------------------------------------------------------


def test_cancel_deletes_with_grace_and_reports_cancelled_from_another_instance(k8s, backend, root):
    handle = backend.submit(request(root, command=SLEEP))
    k8s.wait_for_pod(handle.data["pod"], "Running")
    backend.cancel(handle)
    pod = k8s.get_pod(handle.data["pod"])
    assert pod is None or ANNOTATION_CANCELLED in pod["metadata"]["annotations"]
    assert pod is None or pod["metadata"]["deletionGracePeriodSeconds"] == 1
    other = make_backend(k8s, root)
    try:  # while the pod is terminating, the annotation says who did it; its container may still run
        status = other.poll(handle)
        assert status.state in (RunState.CANCELLED, RunState.RUNNING, RunState.LOST)  # LOST: already gone
        if status.state is RunState.RUNNING:
            assert status.remote_state == "Terminating" and "cancelled by Airflow" in status.message
    finally:
        other.close()
    k8s.wait_for_pod(handle.data["pod"], "Deleted")
    # The watch brings the DELETED event a moment after the double removed the pod: wait for it.
    deadline = time.monotonic() + 60
    while backend.poll(handle).state is not RunState.CANCELLED:
        assert time.monotonic() < deadline, backend.poll(handle)
        time.sleep(0.05)


def test_finished_pod_is_never_reattached(k8s, root):
    b = make_backend(k8s, root, delete_policy="never")
    try:
        req = request(root, command=["true"])
        handle, outcome, _ = run(b, req)
        assert b.find(req.identity) is not None
        b.mark_finished(handle)
        assert k8s.get_pod(handle.data["pod"])["metadata"]["labels"][LABEL_FINISHED] == "true"
        assert b.find(req.identity) is None
    finally:
        b.close()


def test_delete_policy_on_success_keeps_failed_pods(k8s, backend, root):
    ok, outcome_ok, _ = run(backend, request(root, task="ok", command=["true"]))
    bad, outcome_bad, _ = run(backend, request(root, task="bad", command=["false"]))
    backend.mark_finished(ok)
    backend.cleanup(ok, outcome_ok.status)
    backend.mark_finished(bad)
    backend.cleanup(bad, outcome_bad.status)
    k8s.wait_for_pod(ok.data["pod"], "Deleted")
    kept = k8s.get_pod(bad.data["pod"])
    assert kept is not None and kept["metadata"]["labels"][LABEL_FINISHED] == "true"


def test_submit_after_a_crash_attaches_to_the_existing_pod(k8s, backend, root):
    req = request(root, command=SLEEP)
    first = backend.submit(req)
    again = make_backend(k8s, root)
    try:
        second = again.submit(req)  # a retry that never learnt of the first create
    finally:
        again.close()
    assert second.data["pod"] == first.data["pod"] and second.data["uid"] == first.data["uid"]
    assert len([p for p in k8s.list_pods() if p["metadata"]["name"] == first.data["pod"]]) == 1
    backend.cancel(first)


# -- retries, watch resync ---------------------------------------------------------------------------------


def test_create_retries_429_honouring_retry_after_and_503(k8s, backend, root):
    k8s.fail_next(429, retry_after=1, method="POST", kind="pods")
    k8s.fail_next(503, method="POST", kind="pods")
    started = time.monotonic()
    handle = backend.submit(request(root, command=["true"]))
    assert time.monotonic() - started >= 1.0
    assert k8s.count(method="POST", kind="pods") == 3
    assert k8s.get_pod(handle.data["pod"]) is not None


def test_retries_give_up_with_a_transient_error(k8s, root):
    b = make_backend(k8s, root, api_retries=1)
    try:
        k8s.fail_next(500, count=5, method="GET", kind="pods")
        with pytest.raises(TransientBackendError):
            b.find(StepIdentity("d", "t", "r"))
    finally:
        b.close()
        k8s.clear_faults()


def test_sync_wait_resumes_after_dropped_watches_and_410(k8s, backend, root):
    handle = backend.submit(request(root, command=["python3", "-c", "import time; time.sleep(2)"]))
    k8s.wait_for_pod(handle.data["pod"], "Running")
    status = backend.wait(handle, 0.3)  # watch established, resourceVersion remembered
    assert status.state is RunState.RUNNING
    k8s.add_secret("unrelated", {"k": "v"})  # the cluster moves on...
    k8s.reset_counts()
    k8s.compact()  # ...and the remembered resourceVersion is now too old: 410, then a fresh list
    k8s.drop_watches(abrupt=True)
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 30)
    assert outcome.status.is_successful
    assert k8s.count(method="GET", kind="pods", watch=False) >= 1  # listed again after the 410


def test_sync_wait_notices_the_end_at_once(k8s, backend, root):
    k8s.register_image("sim/step:*", ImageBehavior(simulate=True, duration=None))
    handle = backend.submit(request(root, image="sim/step:1", command=["ignored"]))
    k8s.wait_for_pod(handle.data["pod"], "Running")
    backend.wait(handle, 0.2)
    done: list[float] = []

    def finish() -> None:
        # Once the wait's watch is open (an event, not a fixed sleep), end the container.
        deadline = time.monotonic() + 30
        while k8s.active_watches < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        done.append(time.monotonic())
        k8s.finish_container(handle.data["pod"])

    import threading

    threading.Thread(target=finish).start()
    status = backend.wait(handle, 20)
    assert status.is_successful
    assert done  # it returned after the container finished, long before the 20 s timeout


# -- logs --------------------------------------------------------------------------------------------------


def test_logs_resume_without_duplicates_or_loss(k8s, backend, root):
    code = "import time\nfor i in range(30):\n    print(f'line {i}', flush=True)\n    time.sleep(0.05)"
    handle = backend.submit(request(root, command=["python3", "-c", code]))
    k8s.wait_for_pod(handle.data["pod"], "Running")
    seen: list[str] = []
    cursor = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        chunk = backend.read_logs(handle, cursor)
        seen += chunk.lines
        cursor = chunk.cursor
        if backend.poll(handle).is_terminal and not chunk.lines:
            break
        time.sleep(0.07)
    assert [x for x in seen if x.startswith("line ")] == [f"line {i}" for i in range(30)]


# -- the shared watch (deferred mode) ---------------------------------------------------------------------


def test_many_waiting_steps_share_one_watch(k8s, root):
    k8s.register_image("sim/step:*", ImageBehavior(simulate=True, duration=None, output="working\n"))
    submitter = make_backend(k8s, root)
    handles = [submitter.submit(request(root, task=f"s{i}", image="sim/step:1", command=["x"])) for i in range(20)]
    for h in handles:
        k8s.wait_for_pod(h.data["pod"], "Running")
    k8s.reset_counts()

    async def main() -> list[Any]:
        async def one(h):
            b = make_backend(k8s, root, log_interval=60)
            try:
                return await await_completion(b, h, deadline=time.monotonic() + 60)
            finally:
                await b.aclose()

        tasks = [asyncio.create_task(one(h)) for h in handles]
        # Wait until every step waits on the shared watch (an event, not a fixed sleep), then count.
        await until(lambda: sum(len(s._waiters) for s in shared_watch.sessions()) == len(handles))
        assert k8s.count(kind="pods", watch=True) == 1
        for h in handles:
            await asyncio.to_thread(k8s.finish_container, h.data["pod"])
        return await asyncio.gather(*tasks)

    outcomes = asyncio.run(main())
    assert all(o.status.is_successful for o in outcomes)
    assert k8s.count(kind="pods", watch=True) == 1
    assert k8s.count(method="GET", kind="pods/{name}") == 0  # every status came from the shared cache
    assert k8s.count(method="GET", kind="pods", watch=False) == 1  # one list for all
    submitter.close()


def test_shared_watch_resyncs_after_a_drop_and_a_410(k8s, root):
    k8s.register_image("sim/step:*", ImageBehavior(simulate=True, duration=None))
    b = make_backend(k8s, root)
    handle = b.submit(request(root, image="sim/step:1", command=["x"]))
    k8s.wait_for_pod(handle.data["pod"], "Running")

    async def main() -> Any:
        waiter = asyncio.create_task(await_completion(b, handle, deadline=time.monotonic() + 60))
        await until(lambda: b.session_stats.watches >= 1 and k8s.active_watches >= 1)
        await asyncio.to_thread(k8s.add_secret, "unrelated", {"k": "v"})
        await asyncio.to_thread(k8s.compact)
        await asyncio.to_thread(k8s.drop_watches, abrupt=True)
        # Resynced: the resumed watch got 410, the session listed again and watches anew.
        await until(lambda: b.session_stats.expired == 1 and b.session_stats.lists == 2
                    and b.session_stats.watches >= 3 and k8s.active_watches >= 1)
        await asyncio.to_thread(k8s.finish_container, handle.data["pod"])
        outcome = await waiter
        await b.aclose()
        return outcome

    outcome = asyncio.run(main())
    assert outcome.status.is_successful
    assert b.session_stats.expired == 1 and b.session_stats.lists == 2
    assert k8s.count(kind="pods", watch=True) >= 2
    b.close()


def test_async_cancel_and_lost_through_the_shared_watch(k8s, backend, root):
    cancelled = backend.submit(request(root, task="c", command=SLEEP))
    lost = backend.submit(request(root, task="l", command=SLEEP))
    k8s.wait_for_pod(cancelled.data["pod"], "Running")
    k8s.wait_for_pod(lost.data["pod"], "Running")

    async def main() -> tuple[Any, Any]:
        a = asyncio.create_task(await_completion(backend, cancelled, deadline=time.monotonic() + 60))
        b = asyncio.create_task(await_completion(backend, lost, deadline=time.monotonic() + 60))
        await until(lambda: sum(len(s._waiters) for s in shared_watch.sessions()) == 2)
        await backend.acancel(cancelled)
        await asyncio.to_thread(k8s.delete_pod, lost.data["pod"], grace_seconds=0)
        result = await a, await b
        await backend.aclose()
        return result

    a, b = asyncio.run(main())
    assert a.status.state is RunState.CANCELLED
    assert b.status.state is RunState.LOST


def test_sessions_close_when_the_loop_ends(k8s, backend, root):
    handle = backend.submit(request(root, command=["true"]))

    async def main() -> int:
        await await_completion(backend, handle, deadline=time.monotonic() + 30)
        count = len(shared_watch.sessions())
        await backend.aclose()
        await until(lambda: not shared_watch.sessions())  # closed session_linger after its release
        return count + 10 * len(shared_watch.sessions())

    assert asyncio.run(main()) == 1
    assert json.dumps(handle.to_json())


# -- RBAC ---------------------------------------------------------------------------------------------------


def _verb(method: str, kind: str, watch: bool) -> tuple[str, str]:
    resource = "pods/log" if kind.endswith("/log") else "pods"
    if method == "GET":
        return resource, ("watch" if watch else "list" if kind == "pods" else "get")
    return resource, {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}[method]


def test_the_role_grants_exactly_the_verbs_the_backend_uses(k8s, backend, root):
    import yaml

    role = next(d for d in yaml.safe_load_all((Path(__file__).parents[2] / "backends/kubernetes/rbac.yaml")
                                              .read_text()) if d["kind"] == "Role")
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    k8s.reset_counts()
    # Every call the backend makes in a step's life: submit, find, wait, logs, result, mark, cleanup, cancel.
    ok = request(root, task="ok", command=["python3", "-c", "print('hi')"])
    handle, outcome, _ = run(backend, ok)
    backend.find(ok.identity)
    backend.fetch_result(handle)
    backend.log_tail(handle)
    backend.mark_finished(handle)
    backend.cleanup(handle, outcome.status)
    kept = make_backend(k8s, root, delete_policy="never")
    try:
        handle2, outcome2, _ = run(kept, request(root, task="kept", command=["true"]))
        kept.mark_finished(handle2)
    finally:
        kept.close()
    slow = backend.submit(request(root, task="slow", command=SLEEP))
    k8s.wait_for_pod(slow.data["pod"], "Running")

    async def deferred() -> None:
        await backend.await_change(slow, 0.5)
        await backend.aread_logs(slow, None)
        await backend.acancel(slow)
        await backend.aclose()

    asyncio.run(deferred())
    used = {_verb(r.method, r.kind, r.watch) for r in k8s.requests}
    assert used == granted
