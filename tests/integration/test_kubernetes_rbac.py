"""``backends/kubernetes/rbac.yaml`` applied to the API test double, which evaluates RBAC as kube-apiserver does.

Each account the manifest names gets a token and is checked for exactly what it needs: the Airflow
worker runs a sync step's whole life, the triggerer a deferred wait and cancel, the out-of-cluster account
the same as the worker, and the step pod's own account nothing at all.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_remote_ml.backends.kubernetes import KubernetesBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.wait import await_completion, wait_for_completion
from tests.fakes.kubernetes_api import FakeKubernetes

pytestmark = pytest.mark.timeout(120)

MANIFEST = Path(__file__).parents[2] / "backends/kubernetes/rbac.yaml"
STEPS = "ml-steps"
CLAIM = "ml-artifacts"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeKubernetes, str]]:
    with FakeKubernetes(namespace="airflow") as k8s:
        k8s.create_namespace(STEPS)
        # What the Airflow Helm chart creates in Airflow's namespace; the manifest binds them.
        k8s.add_service_account("airflow-worker", namespace="airflow")
        k8s.add_service_account("airflow-triggerer", namespace="airflow")
        k8s.apply(list(yaml.safe_load_all(MANIFEST.read_text())), namespace=STEPS)
        root = tmp_path / "artifacts"
        k8s.register_volume_claim(CLAIM, root, namespace=STEPS)
        yield k8s, str(root)


def backend_as(k8s: FakeKubernetes, root: str, tmp: Path, account: str, namespace: str) -> KubernetesBackend:
    token = k8s.service_account_token(account, namespace=namespace)
    path = tmp / f"kubeconfig-{account}-{uuid.uuid4().hex[:6]}"
    path.write_text(json.dumps(k8s.kubeconfig_for_token(token)))
    return KubernetesBackend.from_config({
        "kubeconfig_path": str(path), "namespace": STEPS, "service_account_name": "remote-ml-steps",
        "artifact_volume": {"claim_name": CLAIM, "mount_path": root}, "delete_grace_seconds": 1,
        "session_linger": 0.1})


def request(root: str, task: str, command: list[str]) -> StepRequest:
    spec = StepSpec.build(image="python:3.11-slim", command=command)
    return StepRequest.create(spec, StepIdentity("rbac", task, f"run-{uuid.uuid4().hex[:8]}"), ArtifactStore(root))


def forbidden(k8s: FakeKubernetes) -> list[Any]:
    return [r for r in k8s.requests if r.status == 403]


@pytest.mark.parametrize(("account", "namespace"), [("airflow-worker", "airflow"), ("airflow-remote-ml", STEPS)])
def test_the_api_accounts_run_a_sync_step_end_to_end_without_a_403(cluster, tmp_path, account, namespace):
    k8s, root = cluster
    b = backend_as(k8s, root, tmp_path, account, namespace)
    try:
        req = request(root, "ok", ["python3", "-c", "print('hi')"])
        handle = b.submit(req)
        lines: list[str] = []
        outcome = wait_for_completion(b, handle, on_line=lines.append, deadline=time.monotonic() + 60)
        assert outcome.status.is_successful, outcome.status
        assert "hi" in lines
        assert b.find(req.identity) is not None
        b.fetch_result(handle)
        b.log_tail(handle)
        b.mark_finished(handle)
        b.cleanup(handle, outcome.status)
        slow = b.submit(request(root, "slow", ["python3", "-c", "import time; time.sleep(300)"]))
        k8s.wait_for_pod(slow.data["pod"], "Running", namespace=STEPS)
        b.cancel(slow)
    finally:
        b.close()
    assert forbidden(k8s) == []
    # The pod ran as the steps' own account, which the admission plugin found.
    assert k8s.count(method="POST", kind="pods") == 2


def test_the_triggerer_account_waits_and_cancels_deferred_without_a_403(cluster, tmp_path):
    k8s, root = cluster
    submitter = backend_as(k8s, root, tmp_path, "airflow-worker", "airflow")
    done = submitter.submit(request(root, "done", ["python3", "-c", "print('hi')"]))
    slow = submitter.submit(request(root, "slow", ["python3", "-c", "import time; time.sleep(300)"]))
    submitter.close()
    k8s.wait_for_pod(slow.data["pod"], "Running", namespace=STEPS)
    b = backend_as(k8s, root, tmp_path, "airflow-triggerer", "airflow")

    async def main() -> Any:
        try:
            outcome = await await_completion(b, done, deadline=time.monotonic() + 60)
            await b.await_change(slow, 0.2)
            await b.aread_logs(slow, None)
            await b.acancel(slow)
            return outcome
        finally:
            await b.aclose()

    outcome = asyncio.run(main())
    assert outcome.status.is_successful, outcome.status
    assert forbidden(k8s) == []


def test_the_step_account_can_do_nothing_and_the_api_accounts_nothing_more(cluster, tmp_path):
    import urllib.error
    import urllib.request

    k8s, _ = cluster

    def status(token: str, path: str, method: str = "GET") -> int:
        req = urllib.request.Request(k8s.url + path, method=method, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    step = k8s.service_account_token("remote-ml-steps", namespace=STEPS)
    for path in (f"/api/v1/namespaces/{STEPS}/pods", f"/api/v1/namespaces/{STEPS}/pods/x/log",
                 f"/api/v1/namespaces/{STEPS}/secrets"):
        assert status(step, path) == 403, path
    worker = k8s.service_account_token("airflow-worker", namespace="airflow")
    assert status(worker, f"/api/v1/namespaces/{STEPS}/pods") == 200
    assert status(worker, f"/api/v1/namespaces/{STEPS}/secrets") == 403  # the kubelet resolves secretKeyRef
    assert status(worker, "/api/v1/namespaces/airflow/pods") == 403  # only the steps' namespace
    assert status(worker, f"/api/v1/namespaces/{STEPS}/pods", "DELETE") == 403  # no deletecollection
    assert status(worker, "/api/v1/namespaces") == 403  # nothing cluster-wide


def test_the_step_pod_runs_as_the_manifests_step_account(cluster, tmp_path):
    k8s, root = cluster
    b = backend_as(k8s, root, tmp_path, "airflow-worker", "airflow")
    try:
        handle = b.submit(request(root, "sa", ["true"]))
        pod = k8s.get_pod(handle.data["pod"], namespace=STEPS)
    finally:
        b.close()
    assert pod is not None and pod["spec"]["serviceAccountName"] == "remote-ml-steps"
