"""``airflow remote-ml jobs``: a step whose worker was SIGKILLed keeps running; the CLI finds it and ends it.

Everything runs as an operator would: ``airflow dags test`` runs a DAG whose step sleeps (on the local
backend, and on the real Docker engine), the test SIGKILLs that Airflow process (the worker dies; the step,
in a session or container of its own, does not), then runs the ``airflow`` CLI as subprocesses against the
same metadata database. Airflow recorded the task instance as ``running`` with the dead process's pid and
host: that is what makes the job an orphan. Every wait polls a condition with a generous bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from tests.conftest import REPO, RUNNER_IMAGE, docker_client

BOUND = 240.0  # airflow dags test parses, migrates nothing, and starts the step: slow on a loaded CI box
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float = BOUND) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


DAG_FILE = '''
from datetime import datetime

from airflow.sdk import DAG

from airflow_remote_ml.operators import RemoteExecutionOperator

with DAG("{dag_id}", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    RemoteExecutionOperator(task_id="long_step", backend="{backend}", image={image!r},
                            command=["sleep", "600"])
'''


class Deployment:
    """An AIRFLOW_HOME (the session's migrated database) with a DAGs folder of this test's own."""

    def __init__(self, home: Path, tmp_path: Path, backend: str, image: str | None) -> None:
        self.dag_id = f"remote_ml_cli_{backend}_{uuid.uuid4().hex[:8]}"
        dags = tmp_path / "dags"
        dags.mkdir()
        (dags / "orphan_dag.py").write_text(textwrap.dedent(DAG_FILE.format(
            dag_id=self.dag_id, backend=backend, image=image)))
        self.state_dir = tmp_path / "state"
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "REMOTE_ML_LOCAL_STATE_DIR": str(self.state_dir),
            "REMOTE_ML_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }

    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True,
                                text=True, timeout=BOUND)
        if check:
            assert result.returncode == 0, f"airflow {' '.join(args)}:\n{result.stdout}\n{result.stderr[-3000:]}"
        return result

    def jobs(self, *args: str) -> list[dict[str, Any]]:
        """``airflow remote-ml jobs ... -o json``, parsed."""
        out = self.airflow("remote-ml", "jobs", *args, "--dag-id", self.dag_id, "-o", "json").stdout
        text = out.strip()
        return [] if text == "No data found" else json.loads(text[text.index("["):])

    def start_dag(self) -> subprocess.Popen[bytes]:
        # A session of its own: the SIGKILL below reaches every process of the worker at once.
        return subprocess.Popen([sys.executable, "-m", "airflow", "dags", "test", self.dag_id], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_worker(worker: subprocess.Popen[bytes]) -> None:
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=BOUND)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def stop_later() -> Iterator[list[Callable[[], None]]]:
    stops: list[Callable[[], None]] = []
    yield stops
    for stop in stops:
        try:
            stop()
        except Exception:  # clean-up after a failed assertion must not hide it
            pass


def test_the_provider_registers_the_command_group(airflow_db, tmp_path):
    deployment = Deployment(airflow_db, tmp_path, "local", None)
    group = deployment.airflow("remote-ml", "--help").stdout
    assert "jobs" in group
    jobs = deployment.airflow("remote-ml", "jobs", "--help").stdout
    assert all(name in jobs for name in ("list", "cancel", "gc"))
    # docs/operations.md shows this very help text.
    doc = (REPO / "docs" / "operations.md").read_text()
    shown = doc.split("$ airflow remote-ml jobs --help\n", 1)[1].split("```", 1)[0]
    assert [line.rstrip() for line in shown.strip().splitlines()] == \
        [line.rstrip() for line in jobs.strip().splitlines()]
    info = deployment.airflow("providers", "get", "airflow-remote-ml", "--full", "-o", "json").stdout
    assert "airflow_remote_ml.cli.get_cli_commands" in info
    bad = deployment.airflow("remote-ml", "jobs", "list", "--older-than", "soon", check=False)
    assert bad.returncode != 0 and "--older-than" in bad.stderr + bad.stdout


def test_a_local_step_left_running_by_a_killed_worker_is_found_cancelled_and_removed(airflow_db, tmp_path,
                                                                                      stop_later):
    deployment = Deployment(airflow_db, tmp_path, "local", None)
    worker = deployment.start_dag()
    stop_later.append(lambda: kill_worker(worker))

    def started() -> list[dict[str, Any]] | None:
        rows = deployment.jobs("list")
        return rows if rows and rows[0]["state"] == "running" else None

    [row] = wait_for("the step to start", started)
    job_dir = Path(row["where"])
    runtime_pid = int((job_dir / "pid").read_text().split()[0])
    step = psutil.Process(runtime_pid)
    tree = [step, *step.children(recursive=True)]
    stop_later.append(lambda: [p.kill() for p in tree if not gone(p.pid)])
    # While its worker lives, the task instance runs the job: no orphan.
    assert row["task_state"] == "running" and row["orphan"] == ""
    assert deployment.jobs("list", "--orphans") == []

    kill_worker(worker)
    assert not gone(runtime_pid), "the step must outlive its worker (its own session)"

    [orphan] = deployment.jobs("list", "--orphans")
    assert orphan["job_id"] == row["job_id"] and orphan["state"] == "running"
    assert orphan["task_state"] == "running"  # what Airflow still believes; the pid it recorded is dead
    assert f"task process {worker.pid}" in orphan["orphan"] and "is gone" in orphan["orphan"]

    [cancelled] = deployment.jobs("cancel", "--orphans")
    assert cancelled["result"] == "cancelled (cancelled)"
    assert all(gone(p.pid) for p in tree), [p.pid for p in tree if not gone(p.pid)]
    [ended] = deployment.jobs("list")
    assert ended["state"] == "terminal"

    # Retention keeps a job that just ended; --older-than 0 picks every finished one. Dry run first.
    assert deployment.jobs("gc") == []
    [would] = deployment.jobs("gc", "--older-than", "0", "--dry-run")
    assert would["result"] == "would remove" and job_dir.is_dir()
    [removed] = deployment.jobs("gc", "--older-than", "0")
    assert removed["result"] == "removed" and not job_dir.exists()
    assert deployment.jobs("list") == []


def test_a_docker_step_left_running_by_a_killed_worker_is_found_cancelled_and_removed(airflow_db, tmp_path,
                                                                                       stop_later):
    client = docker_client(RUNNER_IMAGE)
    deployment = Deployment(airflow_db, tmp_path, "docker", RUNNER_IMAGE)
    worker = deployment.start_dag()
    stop_later.append(lambda: kill_worker(worker))

    def started() -> list[dict[str, Any]] | None:
        rows = deployment.jobs("list", "--backend", "docker")
        return rows if rows and rows[0]["state"] == "running" else None

    [row] = wait_for("the container to start", started)
    container = client.containers.get(row["job_id"])
    stop_later.append(lambda: container.remove(force=True))
    assert deployment.jobs("list", "--backend", "docker", "--orphans") == []

    kill_worker(worker)
    container.reload()
    assert container.status == "running", "the container must outlive its worker"

    [orphan] = deployment.jobs("list", "--backend", "docker", "--orphans")
    assert orphan["job_id"] == row["job_id"] and "is gone" in orphan["orphan"]
    assert orphan["run_id"] and orphan["task_id"] == "long_step"  # the identity, read back from its labels

    [cancelled] = deployment.jobs("cancel", "--backend", "docker", "--orphans")
    assert cancelled["result"].startswith("cancelled")
    container.reload()
    assert container.status == "exited"

    [would] = deployment.jobs("gc", "--backend", "docker", "--older-than", "0", "--dry-run")
    assert would["result"] == "would remove"
    container.reload()  # still there
    [removed] = deployment.jobs("gc", "--backend", "docker", "--older-than", "0")
    assert removed["result"] == "removed"
    import docker

    with pytest.raises(docker.errors.NotFound):
        client.containers.get(row["job_id"])
