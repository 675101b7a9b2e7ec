"""Test-only DAGs of the deployment tests: one step the test steers by files, not by time.

The step records its start and pid in the run's control directory (``params.control_dir``), prints a
few numbered lines, then waits until the test creates ``release`` and prints a few more. With
``ignore_term`` it ignores SIGTERM the way training code that checkpoints on SIGTERM may: only a kill
that escalates to SIGKILL and reaches the step's own session ends it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from airflow_remote_ml.operators import RemoteExecutionOperator

STEP = r"""
set -eu
echo "$$" >> "$CTL/started"
echo "$$" > "$CTL/pid"
if [ "$IGNORE_TERM" = 1 ]; then trap '' TERM; fi
for i in 1 2 3; do echo "step $CTL_ID line before $i"; done
touch "$CTL/printed"
while [ ! -e "$CTL/release" ]; do sleep 0.1; done
for i in 1 2 3; do echo "step $CTL_ID line after $i"; done
"""

for dag_id, deferrable in (("remote_ml_deploy_hold", False), ("remote_ml_deploy_hold_deferred", True)):
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        tags=["deployment-test"],
        params={"control_dir": Param("", type="string"), "ignore_term": Param(False, type="boolean")},
    ) as dag:
        RemoteExecutionOperator(
            task_id="hold",
            backend="local",
            shell=True,
            command=STEP,
            env={"CTL": "{{ params.control_dir }}", "CTL_ID": "{{ run_id }}",
                 "IGNORE_TERM": "{{ 1 if params.ignore_term else 0 }}"},
            deferrable=deferrable,
            # A retry after a worker crash must reattach to the running step (one job, not two).
            retries=1,
            retry_delay=timedelta(seconds=1),
        )
    globals()[dag_id] = dag


with DAG(
    dag_id="remote_ml_deploy_fail_deferred",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["deployment-test"],
) as fail_dag:
    # A deferred step that fails: the task resumes on a worker, whose error carries the exit code and log.
    RemoteExecutionOperator(
        task_id="fail",
        backend="local",
        shell=True,
        command="echo 'loss went NaN at epoch 3'; exit 3",
        deferrable=True,
    )
