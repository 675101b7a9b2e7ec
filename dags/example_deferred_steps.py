"""Deferred waiting and steps in any language: two command steps hand a file over by URI.

With ``deferrable=True`` the worker slot is freed while the step runs; the trigger streams the step's log
into the task log and the task resumes when the job ends. The steps are plain shell and Python commands
that find their files in ``REMOTE_ML_INPUT_<NAME>`` / ``REMOTE_ML_OUTPUT_<NAME>`` and report metrics by
printing JSON objects.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_remote_ml.operators import RemoteExecutionOperator

with DAG(
    dag_id="example_deferred_steps",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "remote-ml"],
    doc_md=__doc__,
    params={"backend": Param("local", type="string"), "image": Param("airflow-remote-ml/runner:latest", type="string")},
) as dag:
    count = RemoteExecutionOperator(
        task_id="count_rows",
        backend="{{ params.backend }}",
        image="{{ params.image }}",
        deferrable=True,
        shell=True,
        command='seq 1 1000 > "$REMOTE_ML_OUTPUT_ROWS"; echo "{\\"rows\\": $(wc -l < "$REMOTE_ML_OUTPUT_ROWS")}"',
        outputs=["rows"],
    )
    RemoteExecutionOperator(
        task_id="sum_rows",
        backend="{{ params.backend }}",
        image="{{ params.image }}",
        deferrable=True,
        command=["python3", "-c", "import os, json; rows = open(os.environ['REMOTE_ML_INPUT_ROWS']).read().split(); "
                                  "print(json.dumps({'total': sum(map(int, rows))}))"],
        inputs={"rows": count.output["outputs"]["rows"]},
    )
