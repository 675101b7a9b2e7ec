"""The example Kubernetes DAG runs unchanged with ``backend=kubernetes`` against the API test double.

Two node pools (default, and a GPU pool tainted ``nvidia.com/gpu``), the shared artifact volume as a PVC,
and the deployment's kubernetes settings in ``[remote_ml] backend_config``: preparation must land on the
default pool and training, through the ``gpu`` profile and a deferred wait, on the GPU node.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fakes.kubernetes_api import FakeKubernetes, FakeNode

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_example_dag_runs_on_kubernetes_with_training_on_the_gpu_pool(airflow_db, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    nodes = [FakeNode("default-1", labels={"pool": "default"}),
             FakeNode("gpu-1", labels={"pool": "gpu"},
                      taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
                      allocatable={"cpu": "8", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"})]
    root = tmp_path / "artifacts"
    # The pods import example_ml from the DAG folder, as an image with the package would.
    with FakeKubernetes(nodes=nodes, extra_env={"PYTHONPATH": str(REPO / "dags")}) as k8s:
        k8s.register_volume_claim("ml-artifacts", root)
        monkeypatch.setenv("AIRFLOW__REMOTE_ML__ARTIFACT_ROOT", str(root))
        monkeypatch.setenv("AIRFLOW__REMOTE_ML__BACKEND_CONFIG", json.dumps({"kubernetes": {
            "kubeconfig_path": str(k8s.kubeconfig_path),
            "artifact_volume": {"claim_name": "ml-artifacts", "mount_path": str(root)},
            "delete_policy": "never",
        }}))
        dag = DagBag(dag_folder=str(REPO / "dags" / "example_kubernetes_pipeline.py")).dags[
            "example_kubernetes_pipeline"]
        run = dag.test(run_conf={"backend": "kubernetes", "image": "python:3.11-slim"})
        pods = {p["metadata"]["labels"]["remote-ml.airflow.apache.org/task-id"]: p for p in k8s.list_pods()}
    assert run.state == "success"
    assert pods["prepare"]["spec"]["nodeName"] == "default-1"
    assert "tolerations" not in pods["prepare"]["spec"] or all(
        t.get("key") != "nvidia.com/gpu" for t in pods["prepare"]["spec"]["tolerations"])
    assert pods["train"]["spec"]["nodeName"] == "gpu-1"
    assert pods["train"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert all(p["metadata"]["labels"]["remote-ml.airflow.apache.org/finished"] == "true" for p in pods.values())
    assert (root / "example_kubernetes_pipeline").is_dir()
