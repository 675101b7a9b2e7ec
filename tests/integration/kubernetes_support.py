"""What the kubernetes integration tests share: the artifact claim, how a backend and a request are made.

The fixtures built on these (``k8s``, ``root``, ``backend``) are declared in each test module, where pytest
looks for them."""

from __future__ import annotations

import uuid
from typing import Any

from airflow_remote_ml.backends.kubernetes import KubernetesBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from tests.fakes.kubernetes_api import FakeKubernetes

CLAIM = "ml-artifacts"
IMAGE = "python:3.11-slim"
SLEEP = ["python3", "-c", "import time; print('started', flush=True); time.sleep(300)"]


def make_backend(k8s: FakeKubernetes, root: str, **extra: Any) -> KubernetesBackend:
    config = {"kubeconfig_path": str(k8s.kubeconfig_path),
              "artifact_volume": {"claim_name": CLAIM, "mount_path": root},
              "delete_grace_seconds": 1, "session_linger": 0.1, **extra}
    return KubernetesBackend.from_config(config)


def request(root: str, task: str = "step", dag_id: str = "k8s-it", **spec: Any) -> StepRequest:
    spec.setdefault("image", IMAGE)
    identity = StepIdentity(dag_id, task, f"run-{uuid.uuid4().hex[:10]}")
    return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(root))
