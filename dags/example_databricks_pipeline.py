"""Example: a PySpark feature step on Databricks feeding training and evaluation on Docker or Kubernetes.

    prepare (train_backend) → features (features_backend, PySpark) → train → evaluate (train_backend)

The data is scikit-learn's diabetes set (``example_ml.steps.prepare``). The feature step
(``backends/databricks/spark_features.py``) standardises the features with Spark on Databricks and
writes ``train.csv``/``test.csv``, which ``example_ml.steps.train``/``evaluate`` read unchanged. Each
step's backend is a DAG param; outputs travel between backends as URIs under the artifact root, so that
root must be a place every backend reaches (an ``s3://`` bucket with fsspec on both sides, or a volume
mounted on the workers and listed in the databricks backend's ``local_mounts``).

    airflow dags test example_databricks_pipeline                     # everything local (plain Python)
    airflow dags test example_databricks_pipeline -c '{"features_backend": "databricks",
        "train_backend": "docker", "databricks_code_dir": "/Workspace/Shared/airflow-remote-ml"}'

On the local backend the feature step runs the same code with its plain-Python engine (no Spark needed);
``feature_engine="spark"`` starts a local Spark instead. The Docker/Kubernetes image of the example has
``example_ml`` but not the feature step, so ``features_backend`` is ``local`` or ``databricks``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param
from example_databricks import FEATURES_CALLABLE, make_features_importable

from airflow_remote_ml.operators import RemoteExecutionOperator

make_features_importable()

with DAG(
    dag_id="example_databricks_pipeline",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "remote-ml", "databricks"],
    doc_md=__doc__,
    params={
        "features_backend": Param("local", type="string", enum=["local", "databricks"],
                                  description="Where the PySpark feature step runs."),
        "train_backend": Param("local", type="string", enum=["local", "docker", "kubernetes"],
                               description="Where preparation, training and evaluation run."),
        "feature_engine": Param("auto", type="string", enum=["auto", "spark", "python"],
                                description="auto: Spark on Databricks, plain Python elsewhere."),
        "databricks_code_dir": Param("/Workspace/Shared/airflow-remote-ml", type="string",
                                     description="Workspace folder (or volume) holding spark_features.py."),
        "image": Param("airflow-remote-ml/example:latest", type="string",
                       description="Image of the container backends."),
    },
) as dag:
    common = {"image": "{{ params.image }}", "retries": 1, "retry_delay": timedelta(seconds=10)}

    prepare = RemoteExecutionOperator(
        task_id="prepare",
        backend="{{ params.train_backend }}",
        callable="example_ml.steps:prepare",
        parameters={"test_fraction": 0.25, "seed": 42},
        outputs=["dataset"],
        **common,
    )

    features = RemoteExecutionOperator(
        task_id="features",
        backend="{{ params.features_backend }}",
        callable=FEATURES_CALLABLE,
        parameters={"engine": "{{ params.feature_engine }}"},
        inputs={"dataset": prepare.output["outputs"]["dataset"]},
        outputs=["features"],
        # On Databricks: the node type comes from the backend's node_types catalogue (or a profile).
        compute={"cpu": 4, "memory": "16Gi"},
        timeout=timedelta(hours=1),
        backend_options={"databricks": {"python_path": ["{{ params.databricks_code_dir }}"]}},
        **common,
    )

    train = RemoteExecutionOperator(
        task_id="train",
        backend="{{ params.train_backend }}",
        callable="example_ml.steps:train",
        parameters={"scenario": "ridge-features-a1", "alpha": 1.0, "features": "all"},
        inputs={"dataset": features.output["outputs"]["features"]},
        outputs=["model"],
        **common,
    )

    evaluate = RemoteExecutionOperator(
        task_id="evaluate",
        backend="{{ params.train_backend }}",
        callable="example_ml.steps:evaluate",
        inputs={"model": train.output["outputs"]["model"], "dataset": features.output["outputs"]["features"]},
        outputs=["report"],
        **common,
    )
