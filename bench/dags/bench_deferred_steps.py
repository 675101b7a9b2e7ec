"""DAGs of bench/bench_deferred.py: N mapped deferred steps that end together when the bench says.

Each step records that it started, then blocks on a shared lock of ``$CTL/gate`` (``flock -s``: no
polling, no CPU) that the bench holds exclusively; when the bench releases it every step ends at once,
writing the time it ended. Two DAGs, the same steps:

- ``bench_deferred_ours``: ``RemoteExecutionOperator``; a success ends in the triggerer.
- ``bench_deferred_worker``: a subclass with its own ``execute_complete`` (which only calls the
  operator's), so every success resumes on a worker, as every deferred step did before (the old path).
- ``bench_deferred_floor``: Airflow's own floor (bench/deferred_floor.py): the same shell lines as a bare
  process, a trigger that waits on its pidfd, pushes one small XCom and ends the task. No provider code.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Param, task

from airflow_remote_ml.operators import RemoteExecutionOperator
from bench.deferred_floor import FloorOperator

STEP = r"""
touch "$CTL/started.$IDX"
flock -s "$CTL/gate" true
date +%s.%N > "$CTL/ended.$IDX"
"""


class ResumingOnAWorker(RemoteExecutionOperator):
    """The old path: the operator's own execute_complete, run on a worker after the trigger fired."""

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        return super().execute_complete(context, event)


for dag_id, operator in (("bench_deferred_ours", RemoteExecutionOperator),
                         ("bench_deferred_worker", ResumingOnAWorker)):
    with DAG(dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
             max_active_tasks=1000, tags=["bench"],
             params={"control_dir": Param("", type="string"), "steps": Param(200, type="integer")}) as dag:

        @task
        def steps(params: dict[str, Any] | None = None) -> list[dict[str, int]]:
            return [{"i": i} for i in range(int((params or {})["steps"]))]

        operator.partial(
            task_id="step",
            backend="local",
            shell=True,
            command=STEP,
            env={"CTL": "{{ params.control_dir }}", "IDX": "{{ ti.map_index }}"},
            deferrable=True,
        ).expand(parameters=steps())
    globals()[dag_id] = dag


with DAG(dag_id="bench_deferred_floor", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         max_active_tasks=1000, tags=["bench"],
         params={"control_dir": Param("", type="string"), "steps": Param(200, type="integer")}) as floor_dag:

    @task
    def floor_steps(params: dict[str, Any] | None = None) -> list[dict[str, str]]:
        return [{"CTL": (params or {})["control_dir"], "IDX": str(i)} for i in range(int((params or {})["steps"]))]

    FloorOperator.partial(task_id="step", command=STEP).expand(env=floor_steps())
