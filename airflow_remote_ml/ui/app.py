"""The FastAPI app behind the "Remote ML" view, mounted by the api-server at :data:`URL_PREFIX`.

Every route checks the caller with Airflow's own auth manager (``requires_access_dag``: the JWT in the
``Authorization`` header or the UI's ``_token`` cookie, then read access to the DAG's runs), the same
dependency the core REST API uses: a plugin's FastAPI app is not protected by anything else.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from airflow_remote_ml.core.report import RunReport, StepRecord, load_run, recent_runs, render_html

HISTORY_RUNS = 10

app = FastAPI(title="Remote ML", description="Steps, metrics and lineage of airflow-remote-ml DAG runs.")

_can_read_runs = Depends(requires_access_dag("GET", DagAccessEntity.RUN))


def _artifact_root() -> str:
    from airflow_remote_ml import hooks

    return hooks.default_artifact_root()


def _xcom_results(session: Any, dag_id: str, run_id: str) -> dict[tuple[str, int], dict[str, Any]]:
    """``return_value`` of every task of the run that looks like a step result (outputs + backend)."""
    from airflow.models.xcom import XComModel

    rows = session.scalars(select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id,
                                                   XComModel.key == "return_value"))
    results = {}
    for row in rows:
        value = XComModel.deserialize_value(row)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, dict) and "outputs" in value and "backend" in value:
            results[(row.task_id, row.map_index)] = value
    return results


def _task_states(session: Any, dag_id: str, run_id: str) -> dict[tuple[str, int], tuple[str | None, str]]:
    from airflow.models.taskinstance import TaskInstance

    rows = session.execute(select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state,
                                  TaskInstance.operator)
                           .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id))
    return {(task_id, map_index): (state, operator or "") for task_id, map_index, state, operator in rows}


def run_report(session: Any, dag_id: str, run_id: str) -> RunReport:
    """The run's version records joined with what Airflow knows of each step (state, backend, job link).

    A step whose record is not (yet) in the artifact root still gets a row: from its XCom result when it
    succeeded elsewhere (a task-level artifact root), or from its task state while it runs.
    """
    report = load_run(_artifact_root(), dag_id, run_id)
    results = _xcom_results(session, dag_id, run_id)
    states = _task_states(session, dag_id, run_id)
    steps: list[StepRecord] = []
    seen = set()
    for step in report.steps:
        key = (step.task_id, step.map_index)
        seen.add(key)
        result = results.get(key, {})
        steps.append(dataclasses.replace(step, backend=result.get("backend"), job_url=result.get("url") or None,
                                         airflow_state=states.get(key, (None, ""))[0]))
    for key, (state, operator) in sorted(states.items()):
        if key in seen or not (key in results or "Remote" in operator or "remote_ml" in operator):
            continue
        result = results.get(key, {})
        manifest = {"status": state or "none", "metrics": result.get("metrics") or {},
                    "outputs": {name: {"uri": uri} for name, uri in (result.get("outputs") or {}).items()}}
        steps.append(StepRecord(key[0], key[1], -1, manifest, "", backend=result.get("backend"),
                                job_url=result.get("url") or None, airflow_state=state))
    return RunReport(dag_id, run_id, steps)


@app.get("/dags/{dag_id}/runs/{run_id}", response_class=HTMLResponse, dependencies=[_can_read_runs])
def run_page(dag_id: str, run_id: str, session: SessionDep) -> HTMLResponse:
    report = run_report(session, dag_id, run_id)
    if not report.steps:
        raise HTTPException(404, f"no airflow-remote-ml step of DAG run {dag_id}/{run_id} has a record yet")
    history = recent_runs(_artifact_root(), dag_id, HISTORY_RUNS)
    return HTMLResponse(render_html(report, history))


@app.get("/api/dags/{dag_id}/runs/{run_id}", dependencies=[_can_read_runs])
def run_data(dag_id: str, run_id: str, session: SessionDep) -> dict[str, Any]:
    return run_report(session, dag_id, run_id).to_json()
