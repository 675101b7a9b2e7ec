"""The example pipeline on Valohai: its steps run as the steps of backends/valohai/valohai.yaml.

The API test server runs each execution's YAML command (``python3 backends/valohai/run_step.py
example_ml.steps:<function> ...``) in a copy of a repository that holds what a real one would: the
valohai.yaml steps' entry script and ``dags/example_ml``. Outputs pass from execution to execution as
``datum://`` URIs, exactly as on Valohai. The second test runs the unchanged example DAG with
``dag.test()`` and the ``backend`` param set to ``valohai``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.backends.valohai import ValohaiBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.wait import wait_for_completion
from tests.fakes.valohai_api import FakeValohai

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "pipeline-token"
#: What a deployment maps: the example's callables to the steps of backends/valohai/valohai.yaml.
STEPS = {f"example_ml.steps:{name}": name for name in ("prepare", "train", "evaluate", "pick_best")}


@pytest.fixture
def valohai(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeValohai]:
    repository = tmp_path / "repository"
    shutil.copytree(REPO / "dags" / "example_ml", repository / "dags" / "example_ml")
    (repository / "backends" / "valohai").mkdir(parents=True)
    shutil.copy(REPO / "backends" / "valohai" / "run_step.py", repository / "backends" / "valohai")
    # The YAML says python3; on this machine that must be the interpreter that has scikit-learn.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    with FakeValohai(token=TOKEN) as server:
        server.add_project("ml-demo", config=(REPO / "backends" / "valohai" / "valohai.yaml").read_text(),
                           repository=repository)
        yield server


def run_step(backend: ValohaiBackend, root: str, task_id: str, function: str, **spec: Any) -> dict[str, Any]:
    identity = StepIdentity("example_ml_pipeline", task_id, f"run-{uuid.uuid4().hex[:8]}")
    request = StepRequest.create(StepSpec.build(callable=f"example_ml.steps:{function}", **spec), identity,
                                 ArtifactStore(root))
    backend.validate(request)
    handle = backend.submit(request)
    lines: list[str] = []
    outcome = wait_for_completion(backend, handle, on_line=lines.append, deadline=None)
    assert outcome.status.is_successful, (outcome.status, lines[-20:])
    return backend.fetch_result(handle).to_xcom()


def test_the_example_steps_run_as_valohai_yaml_steps_chained_by_datums(valohai, tmp_path):
    backend = ValohaiBackend.from_config({"host": valohai.url, "token": TOKEN, "project": "ml-demo",
                                          "branch": "main", "steps": STEPS})
    root = str(tmp_path / "artifacts")
    try:
        prepared = run_step(backend, root, "prepare", "prepare", params={"test_fraction": 0.25, "seed": 42},
                            outputs=["dataset"])
        assert prepared["outputs"]["dataset"].count("datum://") == 2  # train.csv and test.csv
        assert prepared["metrics"] == {"train_rows": 331, "test_rows": 111}
        evaluated = []
        for scenario in ({"scenario": "ridge-all-a1", "alpha": 1.0, "features": "all"},
                         {"scenario": "ridge-bmi-a0.1", "alpha": 0.1, "features": "bmi"}):
            trained = run_step(backend, root, "train", "train", params=scenario,
                               inputs={"dataset": prepared["outputs"]["dataset"]}, outputs=["model"])
            assert trained["metrics"]["scenario"] == scenario["scenario"] and trained["metrics"]["train_rmse"] > 0
            evaluated.append(run_step(backend, root, "evaluate", "evaluate", outputs=["report"], inputs={
                "model": trained["outputs"]["model"], "dataset": prepared["outputs"]["dataset"]}))
        best = run_step(backend, root, "pick_best", "pick_best", params={"candidates": evaluated},
                        outputs=["selection"])
    finally:
        backend.close()
    expected = min(evaluated, key=lambda e: e["metrics"]["test_rmse"])["metrics"]["scenario"]
    assert best["metrics"]["best_scenario"] == expected
    selection = valohai.data[best["outputs"]["selection"].removeprefix("datum://")]
    assert json.loads(open(selection.path).read())["scenario"] == expected
    trains = [valohai.execution(x) for x in valohai.executions if valohai.execution(x)["step"] == "train"]
    assert sorted(t["parameters"]["scenario"] for t in trains) == ["ridge-all-a1", "ridge-bmi-a0.1"]


def test_the_example_dag_runs_on_valohai_by_param(valohai, monkeypatch, airflow_db):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    monkeypatch.setenv("AIRFLOW__REMOTE_ML__BACKEND_CONFIG", json.dumps({"valohai": {
        "host": valohai.url, "token": TOKEN, "project": "ml-demo", "branch": "main", "steps": STEPS}}))
    dag = DagBag(dag_folder=str(REPO / "dags" / "example_ml_pipeline.py")).dags["example_ml_pipeline"]
    run = dag.test(run_conf={"backend": "valohai", "scenario_set": "quick"})
    assert run.state == "success"
    with create_session() as session:
        row = session.query(XComModel).filter(XComModel.run_id == run.run_id, XComModel.task_id == "pick_best",
                                              XComModel.key == "return_value").one()
        uri = XComModel.deserialize_value(row)["outputs"]["selection"]
    assert uri.startswith("datum://")
    assert json.loads(open(valohai.data[uri.removeprefix("datum://")].path).read())["scenario"] == "ridge-all-a1"
    steps = sorted(valohai.execution(x)["step"] for x in valohai.executions)
    assert steps == ["evaluate", "pick_best", "prepare", "train"]
    # The chain stays on Valohai: evaluation downloads the model as the datum train produced, never a path
    # on the Airflow worker (which real Valohai cannot fetch and the API test server now refuses).
    [evaluation] = [valohai.execution(x) for x in valohai.executions if valohai.execution(x)["step"] == "evaluate"]
    assert {url.split("://")[0] for i in evaluation["inputs"] for url in i["urls"]} == {"datum"}


def test_training_on_valohai_with_a_local_artifact_root_fails_before_submit(valohai, monkeypatch, airflow_db):
    """train_backend=valohai hands train the local path prepare wrote: a ConfigError naming the input."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    monkeypatch.setenv("AIRFLOW__REMOTE_ML__BACKEND_CONFIG", json.dumps({"valohai": {
        "host": valohai.url, "token": TOKEN, "project": "ml-demo", "branch": "main", "steps": STEPS}}))
    dag = DagBag(dag_folder=str(REPO / "dags" / "example_ml_pipeline.py")).dags["example_ml_pipeline"]
    run = dag.test(run_conf={"backend": "local", "train_backend": "valohai", "scenario_set": "quick"})
    assert run.state == "failed"
    with create_session() as session:
        states = {ti.task_id: ti.state for ti in session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id)}
    assert states["prepare"] == "success" and states["train"] == "failed"
    assert not valohai.executions  # refused before anything was submitted
