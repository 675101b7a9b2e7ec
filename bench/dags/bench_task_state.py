"""DAG of bench/bench_task_state.py: what Airflow's own bookkeeping calls cost inside a task, timed there.

The operator keeps its step record in the task state store: one ``get`` and three ``set`` calls on a task's
first try (intent, submitted, finished). DockerOperator keeps no record. Both push XCom rows. The task
below times each kind of call ``rounds`` times, alternating, from inside a real task process (each goes
through the supervisor to the API server), and returns the per-call times in milliseconds.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task

with DAG(dag_id="bench_task_state", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         params={"rounds": Param(30, type="integer")}):

    @task
    def calls(params: dict[str, Any] | None = None) -> dict[str, list[float]]:
        context = get_current_context()
        store, ti = context["task_state_store"], context["ti"]
        rounds = int((params or {}).get("rounds", 30))
        record = {"generation": 0, "phase": "submitted", "backend": "docker",
                  "handle": {"job_id": "0123456789ab", "data": {"container_id": "0" * 64}}}
        times: dict[str, list[float]] = {"task_state_store.get": [], "task_state_store.set": [], "xcom_push": []}
        for i in range(rounds):
            for kind, call in (("task_state_store.set", lambda: store.set("bench", record)),
                               ("task_state_store.get", lambda: store.get("bench")),
                               ("xcom_push", lambda i=i: ti.xcom_push(key=f"bench_{i}", value=record))):
                started = time.perf_counter()
                call()
                times[kind].append((time.perf_counter() - started) * 1000)
        return times

    calls()
