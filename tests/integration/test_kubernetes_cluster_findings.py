"""The findings of issue 10 (a real v1.36 cluster), each reproduced against the API test double.

Every test here failed on the backend as it was when the issue was filed; the double's matching rule
(content negotiation, status codes on the deferred path, admission, RBAC, OOM, Pending pods) is what
makes it fail the way the cluster did.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.backends.kubernetes import KubernetesBackend
from airflow_remote_ml.core import ArtifactStore, RunState, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.errors import BackendAPIError, TransientBackendError
from airflow_remote_ml.core.wait import await_completion, failure_error, wait_for_completion
from tests.fakes.kubernetes_api import FakeKubernetes

pytestmark = pytest.mark.timeout(120)

CLAIM = "ml-artifacts"
IMAGE = "python:3.11-slim"
SLEEP = ["python3", "-c", "import time; print('started', flush=True); time.sleep(300)"]
TALK = ["python3", "-c", "print('one', flush=True); print('two', flush=True)"]


@pytest.fixture
def k8s() -> Iterator[FakeKubernetes]:
    with FakeKubernetes(pull_backoff=0.2) as fake:
        yield fake


@pytest.fixture
def root(tmp_path: Path, k8s: FakeKubernetes) -> str:
    path = tmp_path / "artifacts"
    k8s.register_volume_claim(CLAIM, path)
    return str(path)


def make_backend(k8s: FakeKubernetes, root: str, **extra: Any) -> KubernetesBackend:
    config = {"kubeconfig_path": str(k8s.kubeconfig_path),
              "artifact_volume": {"claim_name": CLAIM, "mount_path": root},
              "delete_grace_seconds": 1, "session_linger": 0.1, **extra}
    return KubernetesBackend.from_config(config)


@pytest.fixture
def backend(k8s: FakeKubernetes, root: str) -> Iterator[KubernetesBackend]:
    b = make_backend(k8s, root)
    yield b
    b.close()


def request(root: str, task: str = "step", **spec: Any) -> StepRequest:
    spec.setdefault("image", IMAGE)
    identity = StepIdentity("k8s-issue10", task, f"run-{uuid.uuid4().hex[:10]}")
    return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(root))


# -- 1. pods/log is negotiated: every sync step failed with 406 ---------------------------------------------


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
    k8s.wait_for_pod(handle.job_id, "Succeeded")
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
    k8s.wait_for_pod(handle.job_id, "Succeeded")
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
    k8s.wait_for_pod(handle.job_id, "Running")
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
    pod = k8s.get_pod(handle.job_id)
    assert pod is not None and not pod["metadata"].get("deletionTimestamp")  # nothing was done blindly
    backend.cancel(handle)
