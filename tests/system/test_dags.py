"""Every DAG in dags/ imports cleanly, and the example pipeline runs end to end with dag.test()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_every_dag_imports_cleanly(dagbag):
    assert dagbag.import_errors == {}
    assert "example_ml_pipeline" in dagbag.dags


DAG_IDS = sorted(p.stem for p in (REPO / "dags").glob("example_*.py"))


@pytest.mark.parametrize("dag_file", DAG_IDS)
def test_every_example_dag_runs_with_its_defaults(dagbag, dag_file):
    """Each example DAG is a system test: with its default params (the local backend) it succeeds."""
    dags = [dag for dag in dagbag.dags.values() if Path(dag.fileloc).stem == dag_file]
    assert dags, f"{dag_file}.py defines no DAG"
    for dag in dags:
        run = dag.test()
        assert run.state == "success", (dag.dag_id, _final_states(run))


def _final_states(run) -> dict[str, str]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == run.dag_id,
                                                 TaskInstance.run_id == run.run_id).all()
        return {f"{ti.task_id}[{ti.map_index}]": ti.state for ti in tis}


def _selection(run) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id,
                                              XComModel.task_id == "pick_best", XComModel.key == "return_value").one()
        uri = XComModel.deserialize_value(row)["outputs"]["selection"]
    with open(uri, encoding="utf-8") as fh:
        return json.load(fh)


def test_example_pipeline_runs_on_the_local_backend(dagbag):
    dag = dagbag.dags["example_ml_pipeline"]
    run = dag.test(run_conf={"backend": "local", "scenario_set": "review"})
    states = _final_states(run)
    assert run.state == "success", states
    assert sum(1 for key in states if key.startswith("train[")) == 3
    selection = _selection(run)
    assert selection["scenario"] in {"ridge-all-a1", "ridge-core-a1", "ridge-bmi-a0.1"}
    assert len(selection["ranking"]) == 3


@pytest.mark.docker
def test_example_pipeline_runs_unchanged_on_the_docker_backend(dagbag, docker_example_image):
    dag = dagbag.dags["example_ml_pipeline"]
    run = dag.test(run_conf={"backend": "docker", "scenario_set": "quick", "image": docker_example_image})
    states = _final_states(run)
    assert run.state == "success", states
    assert _selection(run)["scenario"] == "ridge-all-a1"


def test_deferred_mode_end_to_end_through_dag_test(dagbag):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    run = dagbag.dags["example_deferred_steps"].test()
    assert run.state == "success", _final_states(run)
    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.run_id == run.run_id, XComModel.task_id == "sum_rows").all()
        result = XComModel.deserialize_value(next(row for row in rows if row.key == "return_value"))
    # sum_rows read count_rows.output["outputs"]["rows"] from count_rows' one result row.
    assert result["metrics"] == {"total": 500500}
    assert {row.key for row in rows} <= {"return_value", "_link_RemoteJobLink"}


@pytest.fixture(scope="module")
def docker_example_image():
    from tests.conftest import docker_client

    docker_client("airflow-remote-ml/example:latest").close()
    return "airflow-remote-ml/example:latest"
