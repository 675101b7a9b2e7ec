"""The kubernetes backend passes the contract suite against the Kubernetes API test double.

The real ``kubernetes`` client (and ``kubernetes_asyncio`` for the async wait) talks HTTP to
:class:`tests.fakes.kubernetes_api.FakeKubernetes`, whose kubelet runs each pod's command as a local
process. The artifact root is a PersistentVolumeClaim registered to the test's tmp dir and mounted at
that same path, exactly as a shared artifact volume is deployed.

``service`` and ``fault_backend`` are the fault contract's fixtures (see ``tests/contract/faults.py``):
:class:`KubernetesFaults` stages each fault with a knob of the double.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_remote_ml.backends.kubernetes import KubernetesBackend
from airflow_remote_ml.core.identity import LABEL_STEP_ID, StepIdentity
from tests.contract.faults import FaultContract
from tests.contract.suite import BackendContract
from tests.fakes.kubernetes_api import FakeKubernetes

CLAIM = "ml-artifacts"


@pytest.fixture(scope="module")
def k8s() -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as fake:
        yield fake


@pytest.fixture
def artifact_root(tmp_path, k8s) -> str:
    root = tmp_path / "artifacts"
    k8s.register_volume_claim(CLAIM, root)
    return str(root)


def _config(k8s: FakeKubernetes, artifact_root: str, **extra: Any) -> dict[str, Any]:
    return {"kubeconfig_path": str(k8s.kubeconfig_path),
            "artifact_volume": {"claim_name": CLAIM, "mount_path": artifact_root},
            "delete_grace_seconds": 2, "session_linger": 0.1, **extra}


@pytest.fixture
def backend(k8s, artifact_root) -> Iterator[KubernetesBackend]:
    backend = KubernetesBackend.from_config(_config(k8s, artifact_root))
    yield backend
    backend.close()


@pytest.fixture
def image() -> str:
    return "python:3.11-slim"


class KubernetesFaults:
    """The fault contract's ``FaultyService`` for the kubernetes backend: knobs of the API test double."""

    supports = frozenset({"slow_create", "lost_create", "outage", "rate_limit", "deleted", "oom"})

    def __init__(self, k8s: FakeKubernetes) -> None:
        self.k8s = k8s

    def jobs(self, identity: StepIdentity) -> list[tuple[str, bool]]:
        """Every pod ever created with the identity's step-id label (by the double's own record, deleted
        ones included), oldest first, and whether it is still alive (exists and is not Succeeded/Failed)."""
        out = []
        for created in self.k8s.created_pods:
            meta = created["metadata"]
            if (meta.get("labels") or {}).get(LABEL_STEP_ID) != identity.digest:
                continue
            now = self.k8s.get_pod(meta["name"], namespace=meta["namespace"])
            alive = now is not None and now["metadata"]["uid"] == meta["uid"] and \
                now["status"].get("phase") not in ("Succeeded", "Failed")
            out.append((f"{meta['namespace']}/{meta['name']}", alive))
        return out

    def slow_create(self, seconds: float) -> None:
        self.k8s.answer_late(seconds, method="POST", kind="pods")

    def lose_create_response(self) -> None:
        self.k8s.lose_answer(method="POST", kind="pods")

    def outage(self, seconds: float) -> None:
        self.k8s.outage(seconds)

    def rate_limit(self, count: int, retry_after: float) -> None:
        self.k8s.fail_next(429, count=count, retry_after=max(1, math.ceil(retry_after)))

    def delete_job(self, job_id: str) -> None:
        namespace, _, name = job_id.rpartition("/")
        self.k8s.delete_pod(name, grace_seconds=0, namespace=namespace or None)

    def oom_spec(self) -> dict[str, Any]:
        # The double enforces limits.memory as the memory cgroup does: the 200 MB step is OOM-killed.
        return {"image": "python:3.11-slim", "resources": {"memory": "64Mi"},
                "command": ["python3", "-c", "b = b'x' * (200 * 2**20); import time; time.sleep(60)"]}


@pytest.fixture
def service(k8s) -> Iterator[KubernetesFaults]:
    yield KubernetesFaults(k8s)
    k8s.clear_faults()


@pytest.fixture
def fault_backend(k8s, artifact_root) -> Iterator[KubernetesBackend]:
    """The backend with a 1 s client request timeout, so ``slow_create(3)`` outlasts it.

    ``log_interval`` 0.5 s (default 10 s): the shared watch's log budget would otherwise allow the trigger one
    read of a running step per 10 s, and the trigger-restart test's 3 s step is over before a second read, so
    whether its first trigger run shows a line depends on whether line 0 was printed by the first read.
    """
    backend = KubernetesBackend.from_config(_config(k8s, artifact_root, request_timeout=1.0, log_interval=0.5))
    yield backend
    backend.close()


@pytest.mark.timeout(180)
class TestKubernetesBackend(BackendContract):
    pass


# -- the adapter's faults, driven through the backend (until the shared fault suite runs them all) ----------


def _request(artifact_root: str, **spec: Any) -> Any:
    import uuid

    from airflow_remote_ml.core import ArtifactStore, StepRequest, StepSpec

    spec.setdefault("image", "python:3.11-slim")
    spec.setdefault("command", ["python3", "-c", "print('done')"])
    identity = StepIdentity("k8s-faults", "step", f"run-{uuid.uuid4().hex[:10]}")
    return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(artifact_root))


def _finish(backend: KubernetesBackend, handle: Any) -> Any:
    import time

    from airflow_remote_ml.core.wait import wait_for_completion

    return wait_for_completion(backend, handle, deadline=time.monotonic() + 90)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["slow_create", "lost_create"])
def test_an_ambiguous_create_makes_exactly_one_pod(service, fault_backend, artifact_root, fault):
    req = _request(artifact_root)
    if fault == "slow_create":
        service.slow_create(3)
    else:
        service.lose_create_response()
    handle = fault_backend.submit(req)  # the retried create is a 409 AlreadyExists: it attaches
    assert _finish(fault_backend, handle).status.is_successful
    assert [job for job, _ in service.jobs(req.identity)] == [handle.job_id]
    assert KubernetesBackend.idempotent_submit


@pytest.mark.timeout(120)
def test_rate_limit_and_outage_are_survived(service, fault_backend, artifact_root):
    req = _request(artifact_root, command=["python3", "-c", "import time; time.sleep(2); print('done')"])
    service.rate_limit(2, 1)
    handle = fault_backend.submit(req)
    service.outage(3)
    outcome = _finish(fault_backend, handle)
    assert outcome.status.is_successful, outcome.status
    assert service.jobs(req.identity) == [(handle.job_id, False)]


@pytest.mark.timeout(120)
def test_a_deleted_job_is_lost_and_an_oom_is_oomkilled(service, fault_backend, artifact_root):
    from airflow_remote_ml.core import RunState

    req = _request(artifact_root, command=["python3", "-c", "import time; time.sleep(300)"])
    handle = fault_backend.submit(req)
    service.delete_job(handle.job_id)
    assert _finish(fault_backend, handle).status.state is RunState.LOST
    assert service.jobs(req.identity) == [(handle.job_id, False)]
    oom = _request(artifact_root, **service.oom_spec())
    status = _finish(fault_backend, fault_backend.submit(oom)).status
    assert (status.state, status.reason, status.exit_code) == (RunState.FAILED, "OOMKilled", 137)


@pytest.mark.timeout(300)
class TestKubernetesFaultContract(FaultContract):
    """The shared fault contract (tests/contract/faults.py) on the Kubernetes API double."""

    # The double's kubelet runs each container as local processes and kills them all when the pod is
    # deleted (as containerd does), so a step that ignores SIGTERM is still stopped after the grace period.
    supports = KubernetesFaults.supports | {"crash", "kill", "defer", "trigger_restart", "ignores_sigterm"}

    @pytest.fixture
    def image(self) -> str:
        return "python:3.11-slim"


# -- an outage reaches the core's wait loop ------------------------------------------------------------------

SLEEPS = ["python3", "-c", "import time; print('started', flush=True); time.sleep(300)"]


def _until(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` with a generous bound (an event, never a fixed sleep)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def _running(backend: KubernetesBackend, handle: Any) -> bool:
    from airflow_remote_ml.core import RunState

    return backend.poll(handle).state is RunState.RUNNING


def _raises_transient(call: Any) -> bool:
    from airflow_remote_ml.core.errors import TransientBackendError

    try:
        call()
    except TransientBackendError:
        return True
    return False


@pytest.mark.timeout(180)
def test_every_call_during_an_outage_raises_with_one_request(k8s, service, fault_backend, artifact_root):
    """poll/wait/read_logs that cannot reach the apiserver raise TransientBackendError, one request each.

    wait() used to restart the cut watch in a loop within the call (dozens of watch requests a second) and
    then return the pod's last state as if it were current; poll() restarted it and did the same; a log read
    retried for ~15 s. Each call "succeeded", the core's transient budget was reset by every one, and a task
    waited on a stale pod for as long as the outage lasted (the fault contract's outage test hung).
    """
    from airflow_remote_ml.core.errors import TransientBackendError

    handle = fault_backend.submit(_request(artifact_root, command=SLEEPS))
    try:
        _until(lambda: _running(fault_backend, handle), "the step runs")
        _until(lambda: "started" in fault_backend.read_logs(handle, None).lines, "the log stream sends")
        service.outage(600)  # outlasts the test; the fixture ends it
        for name, call in (("wait", lambda: fault_backend.wait(handle, 60)), ("poll", lambda: fault_backend.poll(handle)),
                           ("wait again", lambda: fault_backend.wait(handle, 60))):
            k8s.reset_counts()
            with pytest.raises(TransientBackendError):
                call()
            assert k8s.count(method="GET", kind="pods", watch=True) <= 1, name
        # The cut log stream is read the classic way: one request per read while the step runs, no retry loop.
        _until(lambda: _raises_transient(lambda: fault_backend.read_logs(handle, None)), "the log read fails")
        k8s.reset_counts()
        with pytest.raises(TransientBackendError):
            fault_backend.read_logs(handle, None)
        assert k8s.count(method="GET", kind="pods/{name}/log") == 1
        # Once the apiserver is back, the same backend follows the pod again from its watch.
        k8s.clear_faults()
        _until(lambda: not _raises_transient(lambda: fault_backend.wait(handle, 0.1)), "the watch resumes")
        assert _running(fault_backend, handle)
    finally:
        k8s.clear_faults()
        fault_backend.cancel(handle)


class _UnansweredWatches:
    """A CoreV1Api whose pod watches go unanswered while ``held`` is set (an apiserver that accepted the
    connection and never answers: overloaded, or its etcd stalled), all else passed through."""

    def __init__(self, core: Any) -> None:
        import threading

        self._core = core
        self.held = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def list_namespaced_pod(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("watch") and self.held.is_set():
            self.release.wait(120)
            raise ConnectionResetError("the test released the held watch")
        return self._core.list_namespaced_pod(*args, **kwargs)


@pytest.mark.timeout(180)
def test_a_watch_the_apiserver_never_answers_raises_after_the_request_timeout(k8s, artifact_root):
    from airflow_remote_ml.backends.kubernetes._config import KubernetesConfig
    from airflow_remote_ml.core.errors import TransientBackendError

    config = KubernetesConfig.from_mapping(_config(k8s, artifact_root, request_timeout=1.0), "kubernetes")
    plain = KubernetesBackend(config)
    core = _UnansweredWatches(plain.core)
    backend = KubernetesBackend(config, core_v1=core)
    handle = backend.submit(_request(artifact_root, command=SLEEPS))
    try:
        _until(lambda: _running(backend, handle), "the step runs")
        core.held.set()
        k8s.drop_watches()  # the server ends the open watch; the one that resumes it is never answered
        with pytest.raises(TransientBackendError, match="has not answered"):
            backend.wait(handle, 60)
        with pytest.raises(TransientBackendError, match="has not answered"):
            backend.poll(handle)
    finally:
        core.held.clear()
        core.release.set()
        backend.cancel(handle)
        backend.close()
        plain.close()


@pytest.mark.timeout(180)
def test_a_deferred_wait_during_an_outage_raises_instead_of_serving_the_cache(k8s, service, fault_backend,
                                                                             artifact_root):
    """The triggerer's twin: await_change/apoll raise while the shared watch is broken.

    The shared watch used to retry in the background while await_change answered from its cache, so a deferred
    task waited on a stale pod (each call "succeeding") for as long as an outage lasted.
    """
    import asyncio
    import time

    from airflow_remote_ml.core import RunState
    from airflow_remote_ml.core.errors import TransientBackendError

    handle = fault_backend.submit(_request(artifact_root, command=SLEEPS))

    async def scenario() -> None:
        deadline = time.monotonic() + 60
        while (await fault_backend.apoll(handle)).state is not RunState.RUNNING:
            assert time.monotonic() < deadline, "the step never ran"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(service.outage, 600)  # outlasts the test; the fixture ends it
        with pytest.raises(TransientBackendError):
            await fault_backend.await_change(handle, 60)
        with pytest.raises(TransientBackendError):
            await fault_backend.apoll(handle)
        await asyncio.to_thread(k8s.clear_faults)
        deadline = time.monotonic() + 120
        while True:  # the shared watch resumes on its own once the apiserver is back
            try:
                assert (await fault_backend.await_change(handle, 0.1)).state is RunState.RUNNING
                break
            except TransientBackendError:
                assert time.monotonic() < deadline, "the shared watch never resumed"
                await asyncio.sleep(0.1)
        await fault_backend.aclose()

    try:
        asyncio.run(scenario())
    finally:
        k8s.clear_faults()
        fault_backend.cancel(handle)
