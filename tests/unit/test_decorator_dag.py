"""The TaskFlow twin of the example pipeline (dags/example_ml_taskflow.py) runs with dag.test() on the local backend."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def taskflow_run(airflow_db: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "example_ml_taskflow.py"))
    assert bag.import_errors == {}
    dag = bag.dags["example_ml_taskflow"]
    run = dag.test(run_conf={"backend": "local", "scenario_set": "review"})
    return dag, run


def _xcom(run: Any, task_id: str, map_index: int = -1, key: str = "return_value") -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id,
                                              XComModel.task_id == task_id, XComModel.map_index == map_index,
                                              XComModel.key == key).one()
        value = row.value
    return json.loads(value) if isinstance(value, str) else value


def test_the_taskflow_pipeline_succeeds_and_hands_outputs_downstream(taskflow_run: Any) -> None:
    _dag, run = taskflow_run
    assert run.state == "success"
    prepared = _xcom(run, "prepare")
    # prepare's function returned {"train_rows": ..., "test_rows": ...}: its result, JSON as it returned it.
    assert prepared["result"] == {"train_rows": 331, "test_rows": 111}
    assert os.path.isdir(prepared["outputs"]["dataset"])
    trained = [_xcom(run, "train", i) for i in range(3)]
    assert [t["result"] for t in trained] == [None, None, None]  # steps.train returns nothing
    for i, t in enumerate(trained):
        # Each evaluation read the model its own training step wrote (the upstream output's URI).
        report = _xcom(run, "evaluate", i)
        with open(report["outputs"]["report"], encoding="utf-8") as fh:
            assert json.load(fh)["model"].endswith(os.path.basename(t["outputs"]["model"]))
    best = _xcom(run, "pick_best")
    summary = _xcom(run, "summary")
    assert summary["result"]["selection"] == best["outputs"]["selection"]
    assert summary["result"]["line"].startswith(f"review: {best['result']['best_scenario']} won")


def test_the_trained_models_are_asset_events_with_their_artifacts(taskflow_run: Any) -> None:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    _dag, run = taskflow_run
    with create_session() as session:
        events = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                  .filter(AssetModel.name == "example_ml_taskflow.train.model",
                          AssetEvent.source_run_id == run.run_id).order_by(AssetEvent.source_map_index).all())
        extras = [(e.source_map_index, dict(e.extra)) for e in events]
    assert [index for index, _ in extras] == [0, 1, 2]
    for index, extra in extras:
        trained = _xcom(run, "train", index)
        assert extra["uri"] == trained["outputs"]["model"]
        assert extra["backend"] == "local" and extra["job_id"] == trained["job_id"]
        with open(extra["uri"], "rb") as fh:
            import hashlib

            data = fh.read()
        assert extra["sha256"] == hashlib.sha256(data).hexdigest() and extra["size"] == len(data)
        assert extra["metrics"]["train_rmse"] == trained["metrics"]["train_rmse"]
