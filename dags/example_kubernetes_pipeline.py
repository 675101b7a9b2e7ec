"""Preparation on the default node pool, training on a GPU pool: one DAG, any backend.

On Kubernetes each step is a pod. The ``gpu`` profile sends training to the tainted GPU pool (node
selector + toleration + ``nvidia.com/gpu`` limit), while preparation and evaluation stay on the default
pool and never wake the GPU pool up (it scales to zero when idle). The same DAG runs unchanged with
``backend=docker`` on a laptop, or ``backend=local`` (the default, also its system test):

    airflow dags test example_kubernetes_pipeline                               # local subprocesses
    airflow dags test example_kubernetes_pipeline -c '{"backend": "docker"}'
    airflow dags test example_kubernetes_pipeline -c '{"backend": "kubernetes", "image": "ghcr.io/acme/ml:1"}'

The profiles below are the Kubernetes backend's (``backend_config`` keyed by backend name: only the
chosen backend's section applies); they mirror ``backends/kubernetes/node-pools.yaml``, and a deployment
normally keeps them in ``[remote_ml] backend_config``. The laptop backends (local, docker) run a step
whose profile they do not define with the step's own resources. The cluster connection, namespace and
the shared artifact volume come from the deployment's ``kubernetes`` settings
(see ``docs/backends/kubernetes.md``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from airflow_remote_ml.operators import RemoteExecutionOperator

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

#: What the profiles ``default`` and ``gpu`` mean on Kubernetes.
NODE_POOLS = {
    "default": {"node_selector": {"pool": "default"}},
    "gpu": {"node_selector": {"pool": "gpu"}, "tolerations": [GPU_TOLERATION], "gpu": 1,
            "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}},
}

with DAG(
    dag_id="example_kubernetes_pipeline",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "remote-ml", "kubernetes"],
    doc_md=__doc__,
    params={
        "backend": Param("local", type="string", enum=["local", "docker", "kubernetes"],
                         description="Where every step runs."),
        "image": Param("airflow-remote-ml/example:latest", type="string",
                       description="An image with python3 and the example_ml package (container backends)."),
    },
) as dag:
    step = {
        "backend": "{{ params.backend }}",
        "image": "{{ params.image }}",
        "backend_config": {"kubernetes": {"profiles": NODE_POOLS}},
        "retries": 1,
        "retry_delay": timedelta(seconds=5),
    }

    prepare = RemoteExecutionOperator(
        task_id="prepare",
        callable="example_ml.steps:prepare",
        parameters={"test_fraction": 0.25, "seed": 42},
        outputs=["dataset"],
        compute={"profile": "default", "cpu": 1, "memory": "1Gi"},
        timeout=timedelta(minutes=30),
        **step,
    )

    train = RemoteExecutionOperator(
        task_id="train",
        callable="example_ml.steps:train",
        parameters={"scenario": "ridge-all-a1", "alpha": 1.0, "features": "all"},
        inputs={"dataset": prepare.output["outputs"]["dataset"]},
        outputs=["model"],
        compute={"profile": "gpu", "cpu": 2, "memory": "2Gi"},
        timeout=timedelta(hours=2),
        # A long training step waits in the triggerer (one shared pod watch), not in a worker slot.
        deferrable=True,
        **step,
    )

    evaluate = RemoteExecutionOperator(
        task_id="evaluate",
        callable="example_ml.steps:evaluate",
        inputs={"model": train.output["outputs"]["model"], "dataset": prepare.output["outputs"]["dataset"]},
        outputs=["report"],
        compute={"profile": "default"},
        **step,
    )
