"""``airflow remote-ml jobs`` on the API doubles, through Airflow's own CLI parser, in this process.

``--backend NAME --config JSON`` points the commands at the Kubernetes API double and the Jobs API server;
the metadata database (the session's migrated SQLite) holds no task instance for the steps started here,
so each running job is an orphan, which ``cancel --orphans`` ends on the platform.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from airflow_remote_ml.core import ArtifactStore, RunState, StepIdentity, StepRequest, StepSpec
from tests.contract.test_databricks import CLUSTER, QUICK, RUNTIME_DIR, dbx  # noqa: F401 - fixture
from tests.contract.test_kubernetes import artifact_root as k8s_root  # noqa: F401 - fixture
from tests.contract.test_kubernetes import k8s  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
BOUND = 120.0
SLEEP = ["python3", "-c", "import time; print('started', flush=True); time.sleep(300)"]


def airflow(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    """Run ``airflow <argv> -o json`` with Airflow's parser (provider commands included); the rows printed."""
    from airflow.cli import cli_parser

    args = cli_parser.get_parser().parse_args([*argv, "-o", "json"])
    capsys.readouterr()
    args.func(args)
    out = capsys.readouterr().out.strip()
    return [] if out == "No data found" else json.loads(out[out.index("["):])


def wait_state(backend: Any, handle: Any, states: set[RunState]) -> None:
    deadline = time.monotonic() + BOUND
    while backend.poll(handle).state not in states:
        assert time.monotonic() < deadline, f"job never reached {states}"
        time.sleep(0.1)


def request(root: str, dag_id: str, image: str | None) -> StepRequest:
    spec = StepSpec.build(command=SLEEP, image=image)
    return StepRequest.create(spec, StepIdentity(dag_id, "train", f"run-{uuid.uuid4().hex[:8]}"), ArtifactStore(root))


def test_kubernetes_jobs_are_listed_and_an_orphan_pod_cancelled(airflow_db, capsys, k8s, k8s_root):  # noqa: F811
    from tests.integration.kubernetes_support import make_backend

    backend = make_backend(k8s, k8s_root)
    config = json.dumps({"kubeconfig_path": str(k8s.kubeconfig_path), "delete_grace_seconds": 1})
    dag_id = f"cli-k8s-{uuid.uuid4().hex[:6]}"
    step = request(k8s_root, dag_id, "python:3.11-slim")
    backend.validate(step)
    handle = backend.submit(step)
    try:
        wait_state(backend, handle, {RunState.RUNNING})
        common = ("--backend", "kubernetes", "--config", config, "--dag-id", dag_id)
        [row] = airflow(capsys, "remote-ml", "jobs", "list", *common, "--orphans")
        assert row["job_id"] == handle.job_id and row["state"] == "running"
        assert (row["run_id"], row["orphan"], row["task_state"]) == (step.identity.run_id, "no task instance", None)
        assert airflow(capsys, "remote-ml", "jobs", "cancel", *common, "--orphans", "--dry-run")[0]["result"] \
            == "would cancel"
        assert backend.poll(handle).state is RunState.RUNNING  # a dry run changes nothing
        [cancelled] = airflow(capsys, "remote-ml", "jobs", "cancel", *common, "--orphans")
        assert cancelled["result"].startswith("cancelled")
        wait_state(backend, handle, {RunState.CANCELLED})
    finally:
        backend.cancel(handle)
        backend.close()


def test_databricks_runs_are_listed_and_an_orphan_run_cancelled(airflow_db, capsys, dbx, tmp_path):  # noqa: F811
    from airflow_remote_ml.backends.databricks import DatabricksBackend

    settings = {"new_cluster": CLUSTER, "runtime_dir": RUNTIME_DIR, **QUICK}
    backend = DatabricksBackend.from_config(settings)
    dag_id = f"cli-dbx-{uuid.uuid4().hex[:6]}"
    step = request(str(tmp_path / "artifacts"), dag_id, None)
    backend.validate(step)
    handle = backend.submit(step)
    try:
        wait_state(backend, handle, {RunState.RUNNING})
        common = ("--backend", "databricks", "--config", json.dumps(settings), "--dag-id", dag_id)
        [row] = airflow(capsys, "remote-ml", "jobs", "list", *common)
        assert row["job_id"] == handle.job_id and row["orphan"] == "no task instance"
        assert row["run_id"] == step.identity.run_id  # read back from the task's description
        [cancelled] = airflow(capsys, "remote-ml", "jobs", "cancel", handle.job_id, *common)
        assert cancelled["result"].startswith("cancelled")
        wait_state(backend, handle, {RunState.CANCELLED})
        # A finished run keeps nothing to remove: gc removes nothing, and says why on stderr.
        assert airflow(capsys, "remote-ml", "jobs", "gc", *common, "--older-than", "0") == []
    finally:
        backend.cancel(handle)
        backend.close()
