"""The Databricks example DAG runs end to end with dag.test(): all local, and features on "Databricks".

The second run sends the feature step to the Jobs API test server (the runtime runs it there as a
``spark_python_task``) while preparation, training and evaluation stay local: the cross-backend hand-off
of output URIs is what the example shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fakes.databricks_api import FakeDatabricks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "example_databricks_pipeline"


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "example_databricks_pipeline.py"))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def _xcom(run, task_id: str, key: str):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = session.query(XComModel).filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id,
                                                XComModel.task_id == task_id, XComModel.key == key).one().value
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:  # a plain string is stored as it is
            return value
    return value


def test_all_local(dag) -> None:
    run = dag.test(run_conf={"features_backend": "local", "train_backend": "local", "feature_engine": "python"})
    assert run.state == "success"
    assert _xcom(run, "features", "return_value")["metrics"] == {"engine": "python", "feature_count": 13, "train_rows": 331,
                                                 "test_rows": 111}
    assert _xcom(run, "evaluate", "return_value")["metrics"]["test_rmse"] > 0


def test_features_on_databricks_training_local(dag, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeDatabricks(token="dapi-dag") as dbx:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        monkeypatch.setenv("AIRFLOW__REMOTE_ML__BACKEND_CONFIG", json.dumps({"databricks": {
            "new_cluster": {"spark_version": "15.4.x-scala2.12", "node_type_id": "m5.xlarge", "num_workers": 1},
            "node_types": [{"node_type_id": "m5.xlarge", "cpu": 4, "memory": "16Gi"},
                           {"node_type_id": "m5.2xlarge", "cpu": 8, "memory": "32Gi"}],
            "runtime_dir": "dbfs:/airflow-remote-ml/runtime",
            "poll_first_delay": 0.2, "poll_quick_delay": 0.5,
        }}))
        run = dag.test(run_conf={"features_backend": "databricks", "train_backend": "local",
                                 "feature_engine": "python",
                                 "databricks_code_dir": str(REPO / "backends" / "databricks")})
        assert run.state == "success"
        (run_id,) = dbx.run_ids
        task = dbx.get_run(run_id)["tasks"][0]
        assert task["new_cluster"]["node_type_id"] == "m5.xlarge"  # compute={"cpu": 4, "memory": "16Gi"}
        assert task["spark_python_task"]["python_file"].endswith(".py")
    result = _xcom(run, "features", "return_value")
    assert result["backend"] == "databricks" and result["job_id"] == str(run_id)
    assert result["url"].endswith(f"/run/{run_id}")
    assert _xcom(run, "features", "_link_RemoteJobLink").endswith(f"/run/{run_id}")
    assert _xcom(run, "evaluate", "return_value")["metrics"]["r2"] > 0.3
