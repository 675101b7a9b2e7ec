"""Test-only DAGs of the asset deployment test (tests/deployment/test_assets.py).

The producer's ``@task.remote_ml`` step writes a model naming its run and publishes it as an Asset,
once waiting on a worker and once in the triggerer; the consumer is scheduled on both Assets and its
step reads the model through the Asset input (the artifact of the event that triggered it).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task

from airflow_remote_ml.assets import step_asset
from airflow_remote_ml.operators import RemoteExecutionOperator

PRODUCER = "remote_ml_deploy_asset_producer"
CONSUMER = "remote_ml_deploy_asset_consumer"
MODEL = step_asset(PRODUCER, "train", "model")
MODEL_DEFERRED = step_asset(PRODUCER, "train_deferred", "model")


@task.remote_ml(backend="local", outputs=["model"], assets=True)
def train(run_id: str, outputs: dict[str, str]) -> dict[str, Any]:
    with open(outputs["model"], "w", encoding="utf-8") as fh:
        json.dump({"trained_in": run_id}, fh)
    print(json.dumps({"rmse": 0.25}))
    return {"trained_in": run_id}


with DAG(dag_id=PRODUCER, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         tags=["deployment-test"]) as producer:
    train(run_id="{{ run_id }}")
    # A step this quick ends before the scheduler drains the executor's "success" of the deferring process;
    # Airflow then takes that stale event for a state mismatch and fails the try (apache/airflow#66374,
    # #72716: seen here once in seven runs). The retry reattaches to the finished job, as a user's would.
    train.override(task_id="train_deferred", deferrable=True, retries=1,
                   retry_delay=timedelta(seconds=1))(run_id="{{ run_id }}")

with DAG(dag_id=CONSUMER, schedule=[MODEL, MODEL_DEFERRED], start_date=datetime(2026, 1, 1), catchup=False,
         tags=["deployment-test"]) as consumer:
    RemoteExecutionOperator(
        task_id="score",
        backend="local",
        shell=True,
        command='cp "$REMOTE_ML_INPUT_MODEL" "$REMOTE_ML_OUTPUT_REPORT"',
        inputs={"model": MODEL},
        outputs=["report"],
    )
