"""The kubernetes backend passes the contract suite against the Kubernetes API test double.

The real ``kubernetes`` client (and ``kubernetes_asyncio`` for the async wait) talks HTTP to
:class:`tests.fakes.kubernetes_api.FakeKubernetes`, whose kubelet runs each pod's command as a local
process. The artifact root is a PersistentVolumeClaim registered to the test's tmp dir and mounted at
that same path, exactly as a shared artifact volume is deployed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from airflow_remote_ml.backends.kubernetes import KubernetesBackend
from tests.contract.suite import BackendContract
from tests.fakes.kubernetes_api import FakeKubernetes

CLAIM = "ml-artifacts"


@pytest.fixture(scope="module")
def k8s() -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as fake:
        yield fake


@pytest.mark.timeout(180)
class TestKubernetesBackend(BackendContract):
    @pytest.fixture
    def artifact_root(self, tmp_path, k8s) -> str:
        root = tmp_path / "artifacts"
        k8s.register_volume_claim(CLAIM, root)
        return str(root)

    @pytest.fixture
    def backend(self, k8s, artifact_root) -> Iterator[KubernetesBackend]:
        backend = KubernetesBackend.from_config({
            "kubeconfig_path": str(k8s.kubeconfig_path),
            "artifact_volume": {"claim_name": CLAIM, "mount_path": artifact_root},
            "delete_grace_seconds": 2,
            "session_linger": 0.1,
        })
        yield backend
        backend.close()

    @pytest.fixture
    def image(self) -> str:
        return "python:3.11-slim"
