"""The provider in a real Airflow 3.3 deployment, driven through the REST API v2 as a user would.

``dag.test()`` runs everything in one process: it exercises neither the triggerer, the task
supervisor, heartbeats, nor a worker dying. These tests do, against the session's deployment
(conftest.py): PostgreSQL, scheduler (LocalExecutor), dag-processor, triggerer and api-server.

The test-only DAGs (dags/remote_ml_deploy_steps.py) run a step the test steers through files in a
control directory: the step writes ``started``/``pid``/``printed`` and waits for ``release``, so
every wait here is for an event, never for time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.deployment.harness import (
    Deployment,
    DeploymentError,
    processes_with_env,
    wait_for,
)

PIPELINE = "example_ml_pipeline"
DEFERRED_STEPS = "example_deferred_steps"
FAIL_DEFERRED = "remote_ml_deploy_fail_deferred"
HOLD = {"sync": "remote_ml_deploy_hold", "deferred": "remote_ml_deploy_hold_deferred"}
#: What the trigger logs when it ends a succeeded task itself, and what execute_complete logs on a worker.
ENDED_IN_TRIGGERER = "the task ends in the triggerer"
RESUMED_ON_WORKER = "Resumed on a worker after the trigger fired"
#: The XCom rows a step may leave (issue 11: at most 3): its result and its extra link's row.
ALLOWED_XCOM_KEYS = {"return_value", "_link_RemoteJobLink"}
#: What the Task SDK's task runner logs when a task defers (airflow/sdk/execution_time/task_runner.py).
DEFERRED_LINE = "Pausing task as DEFERRED."
#: Bound of the wait for a step's processes to end after its task was stopped. The step never ends on
#: its own (it waits for ``release``): reaching the bound means nobody stopped it.
STEP_GONE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def live(deployment: Deployment) -> Deployment:
    deployment.wait_for_dags([PIPELINE, DEFERRED_STEPS, FAIL_DEFERRED, *HOLD.values()])
    return deployment


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Path]:
    """The control directory of one step; afterwards the step is released (or killed) so none outlives its test."""
    path = tmp_path / "control"
    path.mkdir()
    yield path
    (path / "release").touch()
    with contextlib.suppress(DeploymentError):
        wait_for("the step to end after release", lambda: not processes_with_env("CTL", str(path)), 60)
    for proc in processes_with_env("CTL", str(path)):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _step_lines(run_id: str) -> list[str]:
    return [f"step {run_id} line {when} {i}" for when in ("before", "after") for i in (1, 2, 3)]


def _job_dirs(deployment: Deployment, dag_id: str, run_id: str, task_id: str) -> list[Path]:
    """The local backend's job directories (one per remote job) of one task instance, read from disk."""
    found = []
    for step_file in Path(deployment.env["REMOTE_ML_LOCAL_STATE_DIR"]).glob("*/step.json"):
        identity = json.loads(step_file.read_text())["identity"]
        if (identity["dag_id"], identity["run_id"], identity["task_id"]) == (dag_id, run_id, task_id):
            found.append(step_file.parent)
    return found


def _wait_for_file(path: Path, deployment: Deployment, dag_id: str, run_id: str) -> None:
    wait_for(f"{path.name} from the step of {dag_id}/{run_id}", path.exists, 180, interval=0.2,
             on_timeout=lambda: deployment.describe_run(dag_id, run_id))


def _record(deployment: Deployment, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    """The step's record in Airflow's task state store, read through the REST API (value and expires_at)."""
    return deployment.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/state-store/airflow_remote_ml")


def _assert_uri_under(value: Any, root: str) -> None:
    assert isinstance(value, str) and value.startswith(root), f"{value!r} is not a URI under {root}"
    assert os.path.exists(value), f"the artifact {value} does not exist"


# -- 1. the example pipeline, sync and deferred --------------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "deferred"])
def test_example_pipeline_runs_end_to_end(live: Deployment, mode: str) -> None:
    """The README's pipeline succeeds with backend=local; steps hand URIs on; deferred really defers."""
    # [operators] default_deferrable is what a deployment sets to make every step wait in the triggerer;
    # the workers (the scheduler's LocalExecutor here) read it when they load the DAG.
    live.set_default_deferrable(mode == "deferred")
    run_id = live.trigger(PIPELINE, {"backend": "local"})
    state = live.wait_for_run(PIPELINE, run_id)
    assert state == "success", live.describe_run(PIPELINE, run_id)

    root = live.env["AIRFLOW__REMOTE_ML__ARTIFACT_ROOT"]
    prepared = live.xcom(PIPELINE, run_id, "prepare")
    assert prepared["backend"] == "local"
    _assert_uri_under(prepared["outputs"]["dataset"], root)
    trained = live.xcom(PIPELINE, run_id, "train", map_index=0)
    _assert_uri_under(trained["outputs"]["model"], root)
    evaluated = live.xcom(PIPELINE, run_id, "evaluate", map_index=0)
    _assert_uri_under(evaluated["outputs"]["report"], root)
    best = live.xcom(PIPELINE, run_id, "pick_best")
    _assert_uri_under(best["outputs"]["selection"], root)
    # The downstream step got the upstream's URIs, not their contents.
    handed = live.xcom(PIPELINE, run_id, "evaluation_inputs")
    assert handed == [{"model": trained["outputs"]["model"], "dataset": prepared["outputs"]["dataset"]}]

    log = live.task_log(PIPELINE, run_id, "prepare", 1)
    deferred = any(line.strip().startswith(DEFERRED_LINE.rstrip(".")) for line in log)
    assert deferred == (mode == "deferred"), f"prepare {'did not defer' if mode == 'deferred' else 'deferred'}:\n" \
                                              + "\n".join(log)
    for task_id, map_index in (("prepare", -1), ("train", 0), ("evaluate", 0), ("pick_best", -1)):
        keys = live.xcom_keys(PIPELINE, run_id, task_id, map_index)
        assert set(keys) <= ALLOWED_XCOM_KEYS and "return_value" in keys, f"{task_id}[{map_index}]: {keys}"


# -- 1b. deferred steps end in the triggerer; the next step reads the URI through the documented syntax ----

def test_a_deferred_success_ends_in_the_triggerer_and_hands_its_uri_on(live: Deployment) -> None:
    """No worker slot after the trigger fired: the trigger pushes the result and ends the task itself.

    ``sum_rows`` reads ``count_rows.output["outputs"]["rows"]``: a quoted or missing URI (what Airflow
    3.3.2 made of ``TaskSuccessEvent(xcoms=...)``) fails it, since it opens that path.
    """
    run_id = live.trigger(DEFERRED_STEPS, {"backend": "local"})
    state = live.wait_for_run(DEFERRED_STEPS, run_id)
    assert state == "success", live.describe_run(DEFERRED_STEPS, run_id)

    root = live.env["AIRFLOW__REMOTE_ML__ARTIFACT_ROOT"]
    counted = live.xcom(DEFERRED_STEPS, run_id, "count_rows")
    _assert_uri_under(counted["outputs"]["rows"], root)
    assert counted["metrics"] == {"rows": 1000}
    summed = live.xcom(DEFERRED_STEPS, run_id, "sum_rows")
    assert summed["metrics"] == {"total": 500500}, summed
    for task_id in ("count_rows", "sum_rows"):
        log = live.task_log(DEFERRED_STEPS, run_id, task_id, 1)
        text = "\n".join(log)
        assert any(DEFERRED_LINE.rstrip(".") in line for line in log), f"{task_id} did not defer:\n{text}"
        assert any(ENDED_IN_TRIGGERER in line for line in log), f"{task_id} did not end in the triggerer:\n{text}"
        assert not any(RESUMED_ON_WORKER in line for line in log), f"{task_id} resumed on a worker:\n{text}"
        # The link's row is Airflow's: the task runner pushes it when the worker's part ends (here, at defer).
        keys = live.xcom_keys(DEFERRED_STEPS, run_id, task_id)
        assert set(keys) <= ALLOWED_XCOM_KEYS and "return_value" in keys, f"{task_id}: {keys}"


def test_a_deferred_failure_resumes_on_a_worker_with_the_real_reason(live: Deployment) -> None:
    run_id = live.trigger(FAIL_DEFERRED)
    state = live.wait_for_run(FAIL_DEFERRED, run_id)
    assert state == "failed", live.describe_run(FAIL_DEFERRED, run_id)
    ti = live.task_instance(FAIL_DEFERRED, run_id, "fail")
    assert ti["state"] == "failed"
    text = live.task_log_json(FAIL_DEFERRED, run_id, "fail", 1)
    assert RESUMED_ON_WORKER in text and ENDED_IN_TRIGGERER not in text, text
    assert "exit code: 3" in text and "loss went NaN at epoch 3" in text, text


# -- 2. a worker SIGKILLed mid-step: the retry reattaches ------------------------------------------------

def test_worker_sigkill_mid_step_retry_reattaches_to_the_one_job(live: Deployment, control: Path) -> None:
    dag_id = HOLD["sync"]
    run_id = live.trigger(dag_id, {"control_dir": str(control)})
    _wait_for_file(control / "printed", live, dag_id, run_id)
    ti = live.wait_for_task(dag_id, run_id, "hold", lambda ti: ti["state"] == "running", "running (try 1)")
    assert ti["try_number"] == 1
    runner = wait_for(f"the task runner 'airflow worker -- {ti['id']}'", lambda: live.task_runner(ti["id"]), 60)
    step_pid = int((control / "pid").read_text())
    # The worker dies the hard way (OOM killer, node loss): no on_kill, no cleanup.
    runner.send_signal(signal.SIGKILL)
    wait_for("the task runner to die", lambda: not runner.is_running() or runner.status() == psutil.STATUS_ZOMBIE, 30)
    assert psutil.pid_exists(step_pid), "the step (its own session) must survive its worker"
    # The record that lets the retry reattach never expires while the job may run (Airflow 3.3 expires a
    # key after [state_store] default_retention_days otherwise).
    record = _record(live, dag_id, run_id, "hold")
    assert record["value"]["phase"] == "submitted" and record["expires_at"] is None, record

    live.wait_for_task(dag_id, run_id, "hold", lambda ti: ti["try_number"] == 2 and ti["state"] == "running",
                       "the retry (try 2) running")
    # The retry has attached once it streams the step's log into its own task log.
    wait_for("the retry to stream the running step's log",
             lambda: _step_lines(run_id)[0] in live.task_log(dag_id, run_id, "hold", 2), 120, interval=0.5,
             on_timeout=lambda: live.describe_run(dag_id, run_id))
    (control / "release").touch()
    state = live.wait_for_run(dag_id, run_id)

    starts = (control / "started").read_text().split()
    jobs = _job_dirs(live, dag_id, run_id, "hold")
    assert starts == [str(step_pid)], f"the step was started {len(starts)} times (pids {starts}); expected once"
    assert len(jobs) == 1, f"{len(jobs)} remote jobs for one task instance: {jobs}"
    assert state == "success", live.describe_run(dag_id, run_id)
    record = _record(live, dag_id, run_id, "hold")
    assert record["value"]["phase"] == "finished" and record["expires_at"], record  # expires as configured


# -- 3. a running task marked failed: its step is gone ------------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "deferred"])
def test_marking_a_running_task_failed_ends_its_step(live: Deployment, control: Path, mode: str) -> None:
    """A user marks the task failed in the UI/API: nothing of the step may keep running (and billing).

    The step ignores SIGTERM, as training code that checkpoints on SIGTERM may: only a cancel that
    escalates to SIGKILL and reaches the step's own process ends it.
    """
    dag_id = HOLD[mode]
    run_id = live.trigger(dag_id, {"control_dir": str(control), "ignore_term": True})
    _wait_for_file(control / "printed", live, dag_id, run_id)
    if mode == "sync":
        live.wait_for_task(dag_id, run_id, "hold", lambda ti: ti["state"] == "running", "running")
    else:
        # Airflow calls a trigger's on_kill only for a trigger a triggerer runs: a task marked failed in the
        # seconds before one picks it up has no hook at all (its next try cancels the job first; see
        # docs/concepts.md). Wait until the trigger runs, as a user would see it in the UI.
        live.wait_for_task(dag_id, run_id, "hold",
                           lambda ti: ti["state"] == "deferred" and bool((ti["trigger"] or {}).get("triggerer_id")),
                           "deferred, its trigger running in the triggerer")
    step_pid = int((control / "pid").read_text())
    assert processes_with_env("CTL", str(control)), "the step's processes should be running now"

    live.set_task_state(dag_id, run_id, "hold", "failed")

    def gone() -> bool:
        return not processes_with_env("CTL", str(control))

    with contextlib.suppress(DeploymentError):
        wait_for("the step's processes to end", gone, STEP_GONE_TIMEOUT, interval=0.5)
    alive = [f"{p.pid} {' '.join(p.cmdline())}" for p in processes_with_env("CTL", str(control))]
    assert not alive, (f"{STEP_GONE_TIMEOUT:.0f} s after the task was marked failed ({mode}), the step (pid "
                       f"{step_pid}) still runs:\n" + "\n".join(alive) + "\n" + live.describe_run(dag_id, run_id))
    assert live.task_instance(dag_id, run_id, "hold")["state"] == "failed"


# -- 4. the triggerer killed and restarted mid-wait -----------------------------------------------------------

def test_triggerer_restart_mid_wait_succeeds_and_logs_each_line_once(live: Deployment, control: Path) -> None:
    dag_id = HOLD["deferred"]
    run_id = live.trigger(dag_id, {"control_dir": str(control)})
    _wait_for_file(control / "printed", live, dag_id, run_id)
    first = live.wait_for_task(dag_id, run_id, "hold",
                               lambda ti: ti["state"] == "deferred" and bool((ti["trigger"] or {}).get("triggerer_id")),
                               "deferred, its trigger running in the triggerer")
    lines = _step_lines(run_id)
    # The first triggerer has streamed the first half of the step's log into the task log.
    wait_for("the triggerer to stream the step's first lines",
             lambda: lines[2] in live.task_log(dag_id, run_id, "hold", 1), 120, interval=0.5,
             on_timeout=lambda: live.describe_run(dag_id, run_id))

    live.kill_component("triggerer", signal.SIGKILL)
    live.start_component("triggerer")
    live.wait_ready(["triggerer"])
    # Release the step only once the new triggerer runs the trigger: the rest of the log is streamed by it.
    live.wait_for_task(dag_id, run_id, "hold",
                       lambda ti: ti["state"] == "deferred" and (ti["trigger"] or {}).get("triggerer_id") not in
                       (None, first["trigger"]["triggerer_id"]), "its trigger adopted by the restarted triggerer")
    (control / "release").touch()
    state = live.wait_for_run(dag_id, run_id)
    assert state == "success", live.describe_run(dag_id, run_id)

    log = live.task_log(dag_id, run_id, "hold", 1)
    counts = {line: sum(1 for event in log if event.strip() == line) for line in lines}
    assert all(count == 1 for count in counts.values()), \
        f"each step line must appear exactly once in the task log; counts: {counts}\n" + "\n".join(log)
    assert (control / "started").read_text().split() == [(control / "pid").read_text().strip()]


# -- 5. a cleared task runs anew, also when Airflow dropped its record on success -----------------------------

def test_a_cleared_task_runs_a_new_job_when_airflow_dropped_its_record(live: Deployment, control: Path) -> None:
    """``[state_store] clear_on_success = True`` (Airflow 3.3; the API server applies it when a worker reports
    success, execution API ``ti_update_state``) deletes the task's state store keys, the step's record among
    them. A user's clear must still run the step again as a new job: before, the next try chose the first
    try's identity again and met its job (the local backend reused its job directory and outputs)."""
    dag_id = HOLD["sync"]
    live.restart_component("api-server", {"AIRFLOW__STATE_STORE__CLEAR_ON_SUCCESS": "True"})
    try:
        (control / "release").touch()  # the step ends as soon as it has printed
        run_id = live.trigger(dag_id, {"control_dir": str(control)})
        assert live.wait_for_run(dag_id, run_id) == "success", live.describe_run(dag_id, run_id)
        store = live.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/hold/state-store")
        assert store["total_entries"] == 0, f"clear_on_success left the task's keys: {store}"

        response = live.api.post(f"/dags/{dag_id}/clearTaskInstances", json={
            "dag_run_id": run_id, "task_ids": ["hold"], "only_failed": False, "dry_run": False})
        assert response.status_code == 200, f"clearTaskInstances: {response.status_code} {response.text}"
        live.wait_for_task(dag_id, run_id, "hold", lambda ti: ti["try_number"] == 2 and ti["state"] == "success",
                           "the cleared task's next try (2) a success")
    finally:
        live.restart_component("api-server", {})
    starts = (control / "started").read_text().split()
    jobs = _job_dirs(live, dag_id, run_id, "hold")
    assert len(starts) == 2, f"the step ran {len(starts)} times for two tries; expected twice (pids {starts})"
    assert len(jobs) == 2, f"{len(jobs)} remote jobs for two tries: {jobs}"
