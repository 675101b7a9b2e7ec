"""The Databricks Jobs API test server, driven by the provider's real ``DatabricksHook``.

These tests pin down what the backend's contract tests and the benchmark rely on: the hook's sync
(``requests``, GET parameters in the query string) and async (``aiohttp``, GET parameters in a JSON
body) paths both work, a ``spark_python_task`` really runs, and errors look like the real service's.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import requests
from airflow.providers.common.compat.sdk import AirflowException
from airflow.providers.databricks.exceptions import DatabricksApiError
from airflow.providers.databricks.hooks.databricks import DatabricksHook
from tenacity import stop_after_attempt, wait_none

from tests.fakes.databricks_api import (
    MSG_MULTI_TASK_OUTPUT,
    FakeDatabricks,
    SimulatedOutcome,
)

# A local test server, no outside service: it runs in every test session and never skips.
pytestmark = pytest.mark.integration

TOKEN = "dapi-test-token"
CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}


def _hook(conn_id: str = "databricks_default") -> Any:
    # No waiting between retries: the tests check that a retry happens, not how long it waits.
    return DatabricksHook(conn_id, retry_args={"stop": stop_after_attempt(3), "wait": wait_none()})


#: Test scripts live in the (mapped) workspace: a cluster cannot read a path on the submitting machine.
WS = "/Workspace/Shared/tests/"


@pytest.fixture
def dbx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    with FakeDatabricks(token=TOKEN) as server:
        server.map_path(WS, tmp_path)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.fixture
def hook(dbx: FakeDatabricks) -> Any:
    return _hook()


def _script(tmp_path: Path, body: str, name: str = "step.py") -> str:
    """Write a script into ``tmp_path`` and return its workspace path (the servers map ``WS`` there)."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return WS + name


def _python_run(python_file: str | Path, *, parameters: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "task_key": "step",
        "spark_python_task": {"python_file": str(python_file), "parameters": parameters or []},
        "new_cluster": dict(CLUSTER),
    }
    task.update(extra.pop("task", {}))
    return {"run_name": "fake-test", "tasks": [task], **extra}


def _notebook_run(key: str = "nb", **extra: Any) -> dict[str, Any]:
    return {
        "run_name": "notebook",
        "tasks": [{"task_key": key, "notebook_task": {"notebook_path": "/Users/x/nb"}, "existing_cluster_id": "c-1"}],
        **extra,
    }


# ----------------------------------------------------------------------------- execution, sync hook


def test_python_task_runs_and_reports_success(dbx: FakeDatabricks, hook: Any, tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        import os, sys
        print("args", sys.argv[1:])
        print("env", os.environ["STEP_MODE"], os.environ["DATABRICKS_RUNTIME_VERSION"])
        """,
    )
    body = _python_run(script, parameters=["--in", "dbfs:/a b"])
    body["tasks"][0]["new_cluster"]["spark_env_vars"] = {"STEP_MODE": "fake"}

    run_id = hook.submit_run(body)
    dbx.wait_until_terminal(run_id)

    state = hook.get_run_state(run_id)
    assert (state.life_cycle_state, state.result_state) == ("TERMINATED", "SUCCESS")
    assert state.is_terminal and state.is_successful
    run = hook.get_run(run_id)
    assert run["run_type"] == "SUBMIT_RUN"
    assert run["run_page_url"] == hook.get_run_page_url(run_id)
    assert run["run_page_url"].startswith(f"{dbx.url}/?o=") and run["run_page_url"].endswith(f"/run/{run_id}")
    assert run["status"] == {
        "state": "TERMINATED",
        "termination_details": {"code": "SUCCESS", "type": "SUCCESS", "message": ""},
    }
    assert run["end_time"] >= run["start_time"] > 0
    for name in ("setup_duration", "execution_duration", "cleanup_duration"):
        assert isinstance(run[name], int)
    (task,) = run["tasks"]
    assert task["task_key"] == "step" and task["run_id"] != run_id
    assert task["state"]["result_state"] == "SUCCESS"
    assert task["cluster_instance"]["cluster_id"] == run["cluster_instance"]["cluster_id"]
    assert hook.get_job_id(run_id) == run["job_id"]

    output = hook.get_run_output(task["run_id"])
    assert "args ['--in', 'dbfs:/a b']" in output["logs"]
    assert "env fake 15.4" in output["logs"]
    assert output["logs_truncated"] is False
    assert "error" not in output
    assert output["metadata"]["run_id"] == task["run_id"]


def test_failing_task_reports_error_and_trace(dbx: FakeDatabricks, hook: Any, tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        print("loading features")
        def transform():
            raise ValueError("column 'age' is missing")
        transform()
        """,
    )
    run_id = hook.submit_run(_python_run(script))
    dbx.wait_until_terminal(run_id)

    state = hook.get_run_state(run_id)
    assert (state.life_cycle_state, state.result_state) == ("TERMINATED", "FAILED")
    assert state.state_message.startswith("Task step failed with message: Workload failed")
    run = hook.get_run(run_id)
    assert run["status"]["termination_details"]["code"] == "RUN_EXECUTION_ERROR"
    task_run_id = run["tasks"][0]["run_id"]

    output = hook.get_run_output(task_run_id)
    assert output["error"] == "ValueError: column 'age' is missing"
    assert output["error_trace"].startswith("Traceback (most recent call last):")
    assert "raise ValueError(\"column 'age' is missing\")" in output["error_trace"]
    assert output["logs"].startswith("loading features")

    # Like the real service, the parent run id has no output, even for a one-task run.
    with pytest.raises(DatabricksApiError) as raised:
        hook.get_run_output(run_id)
    assert raised.value.http_status_code == 400
    assert MSG_MULTI_TASK_OUTPUT in str(raised.value)


def test_exit_code_without_traceback_fails(dbx: FakeDatabricks, hook: Any, tmp_path: Path) -> None:
    script = _script(tmp_path, "import sys\nprint('bye')\nsys.exit(3)\n")
    run_id = hook.submit_run(_python_run(script))
    dbx.wait_until_terminal(run_id)
    output = hook.get_run_output(hook.get_run(run_id)["tasks"][0]["run_id"])
    assert output["error"] == "Python process exited with exit code 3."
    assert "error_trace" not in output


def test_life_cycle_pending_running_terminated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    script = _script(
        tmp_path,
        f"""
        import os, time
        while not os.path.exists({str(flag)!r}):
            time.sleep(0.02)
        """,
    )
    with FakeDatabricks(token=TOKEN, hold_pending=True) as dbx:
        dbx.map_path(WS, tmp_path)
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        hook = _hook()
        run_id = hook.submit_run(_python_run(script))

        task_run_id = dbx.task_run_ids(run_id)["step"]
        dbx.wait_until(task_run_id, "PENDING")  # the task has left BLOCKED and asked for its cluster
        assert hook.get_run_state(run_id).life_cycle_state == "PENDING"
        run = hook.get_run(run_id)
        assert "result_state" not in run["state"]
        assert run["end_time"] == 0 and run["status"]["state"] == "PENDING"
        cluster_id = run["tasks"][0]["cluster_instance"]["cluster_id"]
        assert hook.get_cluster_state(cluster_id).state == "PENDING"

        dbx.release(run_id)
        dbx.wait_until(run_id, "RUNNING")
        running = hook.get_run_state(run_id)
        assert running.life_cycle_state == "RUNNING" and not running.is_terminal
        assert hook.get_cluster_state(cluster_id).state == "RUNNING"
        assert hook.get_run(run_id)["status"]["state"] == "RUNNING"

        flag.touch()
        dbx.wait_until_terminal(run_id)
        assert hook.get_run_state(run_id).result_state == "SUCCESS"
        assert hook.get_cluster_state(cluster_id).state == "TERMINATED"


def test_dbfs_and_volume_paths_map_to_registered_directories(dbx: FakeDatabricks, hook: Any, tmp_path: Path) -> None:
    (tmp_path / "dbfs" / "jobs").mkdir(parents=True)
    (tmp_path / "vol").mkdir()
    _script(tmp_path / "dbfs" / "jobs", "print('from dbfs')\n")
    _script(tmp_path / "vol", "print('from volume')\n")
    dbx.map_path("dbfs:/", tmp_path / "dbfs")
    dbx.map_path("/Volumes/main/ml/", tmp_path / "vol")

    logs = []
    for python_file in ("dbfs:/jobs/step.py", "/Volumes/main/ml/step.py"):
        run_id = hook.submit_run(_python_run(python_file))
        dbx.wait_until_terminal(run_id)
        logs.append(hook.get_run_output(dbx.task_run_ids(run_id)["step"])["logs"].strip())
    assert logs == ["from dbfs", "from volume"]

    run_id = hook.submit_run(_python_run("dbfs:/nowhere/step.py"))
    dbx.wait_until_terminal(run_id)
    assert hook.get_run_state(run_id).result_state == "FAILED"
    assert "dbfs:/nowhere/step.py" in hook.get_run_output(dbx.task_run_ids(run_id)["step"])["error"]


def test_legacy_single_task_form_is_accepted(dbx: FakeDatabricks, hook: Any, tmp_path: Path) -> None:
    script = _script(tmp_path, "print('legacy')\n")
    run_id = hook.submit_run(
        {
            "run_name": "legacy run",
            "new_cluster": dict(CLUSTER),
            "spark_python_task": {"python_file": str(script)},
            "timeout_seconds": "600",
        }
    )
    dbx.wait_until_terminal(run_id)
    (task,) = hook.get_run(run_id)["tasks"]
    assert task["spark_python_task"]["python_file"] == str(script)
    assert hook.get_run_output(task["run_id"])["logs"] == "legacy\n"


def test_logs_are_truncated_to_their_tail(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = _script(tmp_path, "print('x' * 1000)\nprint('THE END')\n")
    with FakeDatabricks(token=TOKEN, logs_limit_bytes=100) as dbx:
        dbx.map_path(WS, tmp_path)
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        hook = _hook()
        run_id = hook.submit_run(_python_run(script))
        dbx.wait_until_terminal(run_id)
        output = hook.get_run_output(dbx.task_run_ids(run_id)["step"])
    assert output["logs_truncated"] is True
    assert len(output["logs"]) == 100
    assert output["logs"].endswith("THE END\n")


# ----------------------------------------------------------------------------- idempotency, cancel, timeout


def test_idempotency_token_returns_the_same_run(dbx: FakeDatabricks, hook: Any, tmp_path: Path) -> None:
    script = _script(tmp_path, "print('once')\n")
    token = "step-identity-" + "x" * 50  # 64 characters: the documented maximum
    assert len(token) == 64
    first = hook.submit_run(_python_run(script, idempotency_token=token))
    second = hook.submit_run(_python_run(script, idempotency_token=token))
    assert first == second
    dbx.wait_until_terminal(first)
    # Still the same run after it finished: a retry after a worker crash reconnects instead of relaunching.
    assert hook.submit_run(_python_run(script, idempotency_token=token)) == first
    assert dbx.run_ids == [first]
    assert hook.get_run_output(dbx.task_run_ids(first)["step"])["logs"] == "once\n"

    other = hook.submit_run(_python_run(script, idempotency_token="another-step"))
    assert other != first

    with pytest.raises(DatabricksApiError) as raised:
        hook.submit_run(_python_run(script, idempotency_token="y" * 65))
    assert raised.value.http_status_code == 400
    assert "INVALID_PARAMETER_VALUE" in str(raised.value)
    assert dbx.run_ids == sorted([first, other])


def test_cancel_kills_the_process_and_is_idempotent(dbx: FakeDatabricks, hook: Any, tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = _script(
        tmp_path,
        f"""
        import pathlib, time
        pathlib.Path({str(started)!r}).touch()
        time.sleep(300)
        """,
    )
    run_id = hook.submit_run(_python_run(script))
    dbx.wait_until(run_id, "RUNNING")
    process = dbx.process_of(run_id)
    assert process is not None

    hook.cancel_run(run_id)
    dbx.wait_until_terminal(run_id)
    state = hook.get_run_state(run_id)
    assert (state.life_cycle_state, state.result_state) == ("TERMINATED", "CANCELED")
    run = hook.get_run(run_id)
    assert run["state"]["user_cancelled_or_timedout"] is True
    assert run["status"]["termination_details"]["code"] == "USER_CANCELED"
    assert process.poll() is not None  # the subprocess is gone

    hook.cancel_run(run_id)  # cancelling a finished run is a no-op, not an error
    assert hook.get_run_state(run_id).result_state == "CANCELED"
    assert dbx.count("jobs/runs/cancel", status=200) == 2


def test_timeout_seconds_times_the_run_out(dbx: FakeDatabricks, hook: Any, tmp_path: Path) -> None:
    script = _script(tmp_path, "import time\ntime.sleep(300)\n")
    run_id = hook.submit_run(_python_run(script, timeout_seconds=1))
    run = dbx.wait_until_terminal(run_id)
    assert run["state"]["result_state"] == "TIMEDOUT"
    assert run["state"]["user_cancelled_or_timedout"] is True
    assert dbx.process_of(run_id).poll() is not None  # type: ignore[union-attr]


def test_delete_refuses_active_runs_and_forgets_deleted_ones(dbx: FakeDatabricks, hook: Any) -> None:
    dbx.simulate("nb", seconds=300)
    run_id = hook.submit_run(_notebook_run(idempotency_token="tok-1"))
    with pytest.raises(DatabricksApiError) as raised:
        hook.delete_run(run_id)
    assert raised.value.http_status_code == 400
    hook.cancel_run(run_id)
    dbx.wait_until_terminal(run_id)
    hook.delete_run(run_id)
    with pytest.raises(DatabricksApiError) as raised:
        hook.get_run(run_id)
    # The real service answers 400 INVALID_PARAMETER_VALUE "Run <id> does not exist." (not 404).
    assert raised.value.http_status_code == 400
    assert f"Run {run_id} does not exist." in str(raised.value)
    with pytest.raises(DatabricksApiError):
        hook.submit_run(_notebook_run(idempotency_token="tok-1"))


# ----------------------------------------------------------------------------- states the fake is told to report


@pytest.mark.parametrize(
    ("life_cycle_state", "result_state", "terminal"),
    [
        ("BLOCKED", None, False),
        ("WAITING_FOR_RETRY", None, False),
        ("QUEUED", None, False),
        ("SKIPPED", None, True),
        ("INTERNAL_ERROR", "FAILED", True),
        ("TERMINATED", "SUCCESS_WITH_FAILURES", True),
    ],
)
def test_forced_states_reach_the_hook(
    dbx: FakeDatabricks, hook: Any, life_cycle_state: str, result_state: str | None, terminal: bool
) -> None:
    dbx.simulate("nb", seconds=300)
    run_id = hook.submit_run(_notebook_run())
    dbx.force_state(run_id, life_cycle_state, result_state, "forced by the test")
    state = hook.get_run_state(run_id)
    assert state.life_cycle_state == life_cycle_state
    assert state.result_state == (result_state or "")
    assert state.is_terminal is terminal
    assert not state.is_successful
    if terminal:
        # A forced terminal state also stops the run's execution.
        dbx.wait_until_terminal(dbx.task_run_ids(run_id)["nb"])


def test_unknown_future_state_is_reported_verbatim(dbx: FakeDatabricks, hook: Any) -> None:
    dbx.simulate("nb", seconds=300)
    run_id = hook.submit_run(_notebook_run())
    dbx.wait_until(run_id, "RUNNING")
    dbx.force_state(run_id, "SOME_FUTURE_STATE")
    assert hook.get_run(run_id)["state"]["life_cycle_state"] == "SOME_FUTURE_STATE"
    assert hook.get_run(run_id)["status"]["state"] == "SOME_FUTURE_STATE"
    # The provider's RunState refuses states it does not know; a backend has to cope with that.
    with pytest.raises(AirflowException, match="Unexpected life cycle state"):
        hook.get_run_state(run_id)
    dbx.clear_forced_state(run_id)
    assert hook.get_run_state(run_id).life_cycle_state == "RUNNING"
    hook.cancel_run(run_id)


def test_multi_task_dependencies_and_success_with_failures(dbx: FakeDatabricks, hook: Any) -> None:
    dbx.simulate("extract", SimulatedOutcome(result_state="FAILED", error="source table missing"))
    cluster = {"existing_cluster_id": "c-1"}
    run_id = hook.submit_run(
        {
            "tasks": [
                {"task_key": "extract", "notebook_task": {"notebook_path": "/a"}, **cluster},
                {
                    "task_key": "train",
                    "depends_on": [{"task_key": "extract"}],
                    "notebook_task": {"notebook_path": "/b"},
                    **cluster,
                },
                {
                    "task_key": "report",
                    "depends_on": [{"task_key": "train"}],
                    "run_if": "ALL_DONE",
                    "notebook_task": {"notebook_path": "/c"},
                    **cluster,
                },
            ]
        }
    )
    run = dbx.wait_until_terminal(run_id)
    results = {t["task_key"]: t["state"]["result_state"] for t in run["tasks"]}
    assert results == {"extract": "FAILED", "train": "UPSTREAM_FAILED", "report": "SUCCESS"}
    # The leaf task succeeded, so the run is SUCCESS_WITH_FAILURES, which the provider treats as a failure.
    state = hook.get_run_state(run_id)
    assert state.result_state == "SUCCESS_WITH_FAILURES" and not state.is_successful
    assert hook.get_run_output(dbx.task_run_ids(run_id)["extract"])["error"] == "source table missing"


def test_runs_get_pages_tasks_in_2_2_but_not_in_2_1(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = [
        {"task_key": f"t{i}", "notebook_task": {"notebook_path": "/n"}, "existing_cluster_id": "c"} for i in range(5)
    ]
    with FakeDatabricks(token=TOKEN, tasks_page_size=2) as dbx:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        hook = _hook()
        run_id = hook.submit_run({"tasks": tasks})
        dbx.wait_until_terminal(run_id)
        dbx.reset_counts()
        assert [t["task_key"] for t in hook.get_run(run_id)["tasks"]] == [f"t{i}" for i in range(5)]
        assert dbx.count("jobs/runs/get") == 3  # the hook followed next_page_token twice
        v21 = requests.get(
            f"{dbx.url}/api/2.1/jobs/runs/get", params={"run_id": run_id}, headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()
        assert len(v21["tasks"]) == 5 and "next_page_token" not in v21


# ----------------------------------------------------------------------------- errors, auth, faults


def test_invalid_submissions_are_rejected_with_documented_error_body(dbx: FakeDatabricks, hook: Any) -> None:
    python_task = {"python_file": "/x.py"}
    bad_bodies: list[dict[str, Any]] = [
        {"tasks": [{"spark_python_task": python_task, "new_cluster": CLUSTER}]},  # no task_key
        {"tasks": [{"task_key": "a", "new_cluster": CLUSTER}]},  # no task type
        {"tasks": [{"task_key": "a", "spark_python_task": python_task, "notebook_task": {"notebook_path": "/n"}}]},
        {"tasks": [{"task_key": "a", "spark_python_task": python_task}]},  # no compute
        {"tasks": [{"task_key": "a", "spark_python_task": {}, "new_cluster": CLUSTER}]},  # no python_file
        {"tasks": [{"task_key": "a", "spark_python_task": python_task, "new_cluster": {"node_type_id": "n"}}]},
        {
            "tasks": [
                {
                    "task_key": "a",
                    "spark_python_task": python_task,
                    "new_cluster": {**CLUSTER, "autoscale": {"min_workers": 4, "max_workers": 2}},
                }
            ]
        },
        {"tasks": [{"task_key": "a", "spark_python_task": python_task, "new_cluster": CLUSTER, "libraries": [{}]}]},
        {"tasks": [{"task_key": "a b", "spark_python_task": python_task, "new_cluster": CLUSTER}]},
        {"run_name": "no task at all"},
    ]
    for body in bad_bodies:
        response = requests.post(
            f"{dbx.url}/api/2.2/jobs/runs/submit", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status_code == 400, body
        error = response.json()
        assert error["error_code"] == "INVALID_PARAMETER_VALUE", body
        assert error["message"], body
    assert dbx.run_ids == []

    # What the provider's operators send: every number as a string.
    ok = _notebook_run(timeout_seconds="60")
    ok["tasks"][0] = {
        "task_key": "nb",
        "notebook_task": {"notebook_path": "/n"},
        "new_cluster": {**CLUSTER, "num_workers": "2", "autoscale": {"min_workers": "1", "max_workers": "3"}},
        "libraries": [{"pypi": {"package": "pandas"}}, {"whl": "dbfs:/w.whl"}],
    }
    assert hook.submit_run(ok) in dbx.run_ids


def test_auth_errors(dbx: FakeDatabricks, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{dbx.url}/api/2.2/jobs/runs/list"
    missing = requests.get(url)
    assert missing.status_code == 401
    assert missing.json() == {
        "error_code": 401,
        "message": "Credential was not sent or was of an unsupported type for this API.",
    }

    monkeypatch.setenv("AIRFLOW_CONN_WRONG", dbx.connection_json(token="dapi-wrong"))
    with pytest.raises(DatabricksApiError) as raised:
        _hook("wrong").get_run_state(1)
    assert raised.value.http_status_code == 403
    assert "Invalid access token." in str(raised.value)
    assert dbx.count("jobs/runs/get", status=403) == 1  # not retried

    dbx.invalid_token_status = 401
    assert requests.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401


def test_429_with_retry_after_is_retried_by_the_hook(dbx: FakeDatabricks, hook: Any) -> None:
    dbx.simulate("nb", seconds=300)
    run_id = hook.submit_run(_notebook_run())
    dbx.wait_until(run_id, "RUNNING")  # the fake's scheduler starts it; a loaded machine may take a moment
    dbx.fail_next("jobs/runs/get", 429, retry_after=2)
    raw = requests.get(
        f"{dbx.url}/api/2.2/jobs/runs/get", params={"run_id": run_id}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert raw.status_code == 429
    assert raw.headers["Retry-After"] == "2"
    assert raw.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"

    dbx.fail_next("jobs/runs/get", 429, retry_after=1)
    dbx.fail_next("jobs/runs/get", 503)
    dbx.reset_counts()
    assert hook.get_run_state(run_id).life_cycle_state == "RUNNING"
    assert [r.status for r in dbx.requests] == [429, 503, 200]

    dbx.fail_next("jobs/runs/get", 500, times=3)
    with pytest.raises(AirflowException, match="failed 3 times"):
        hook.get_run_state(run_id)

    dbx.fail_next("jobs/runs/get", 0)  # connection reset without an answer
    assert hook.get_run_state(run_id).life_cycle_state == "RUNNING"
    hook.cancel_run(run_id)


def test_unknown_endpoints_and_versions(dbx: FakeDatabricks) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{dbx.url}/api/2.0/jobs/runs/list", headers=headers).status_code == 404
    wrong_method = requests.post(f"{dbx.url}/api/2.2/jobs/runs/get", json={"run_id": 1}, headers=headers)
    assert wrong_method.status_code == 404
    assert wrong_method.json()["error_code"] == "ENDPOINT_NOT_FOUND"
    assert requests.get(f"{dbx.url}/api/2.1/jobs/runs/list", headers=headers).json() == {"has_more": False}


# ----------------------------------------------------------------------------- runs/list


def test_runs_list_paging_and_filters(dbx: FakeDatabricks, hook: Any) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    dbx.simulate("slow", seconds=300)
    done = [hook.submit_run(_notebook_run()) for _ in range(4)]
    for run_id in done:
        dbx.wait_until_terminal(run_id)
    active = hook.submit_run(_notebook_run("slow"))
    newest_first = [active, *reversed(done)]

    def page(version: str = "2.2", **params: Any) -> dict[str, Any]:
        response = requests.get(f"{dbx.url}/api/{version}/jobs/runs/list", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    seen, token = [], None
    while True:
        answer = page(limit=2, **({"page_token": token} if token else {}))
        seen += [r["run_id"] for r in answer["runs"]]
        assert "tasks" not in answer["runs"][0]
        if not answer["has_more"]:
            assert "next_page_token" not in answer
            break
        token = answer["next_page_token"]
    assert seen == newest_first

    by_offset = [r["run_id"] for offset in (0, 2, 4) for r in page("2.1", limit=2, offset=offset)["runs"]]
    assert by_offset == newest_first
    assert [r["run_id"] for r in page(active_only="true")["runs"]] == [active]
    assert [r["run_id"] for r in page(completed_only=True)["runs"]] == newest_first[1:]
    assert page(run_type="JOB_RUN") == {"has_more": False}
    assert [r["run_id"] for r in page(run_type="SUBMIT_RUN", limit=1, expand_tasks="true")["runs"]] == [active]
    assert page(limit=1, expand_tasks="true")["runs"][0]["tasks"][0]["task_key"] == "slow"

    both = requests.get(
        f"{dbx.url}/api/2.2/jobs/runs/list", params={"active_only": "true", "completed_only": "true"}, headers=headers
    )
    assert both.status_code == 400 and both.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    too_many = requests.get(f"{dbx.url}/api/2.2/jobs/runs/list", params={"limit": 26}, headers=headers)
    assert too_many.status_code == 400
    hook.cancel_run(active)


# ----------------------------------------------------------------------------- async hook (GET with a JSON body)


async def test_async_hook_methods(dbx: FakeDatabricks, tmp_path: Path) -> None:
    script = _script(tmp_path, "raise SystemExit('stopping: bad input')\n")
    run_id = await asyncio.to_thread(_hook().submit_run, _python_run(script))
    await asyncio.to_thread(dbx.wait_until_terminal, run_id)
    dbx.reset_counts()

    async with _hook() as hook:
        state = await hook.a_get_run_state(run_id)
        run = await hook.a_get_run(run_id)
        url = await hook.a_get_run_page_url(run_id)
        output = await hook.a_get_run_output(run["tasks"][0]["run_id"])

    assert (state.life_cycle_state, state.result_state) == ("TERMINATED", "FAILED")
    assert run["run_id"] == run_id and url == run["run_page_url"]
    assert output["logs"] == "stopping: bad input\n"
    assert output["error"] == "Python process exited with exit code 1."
    # aiohttp sent the parameters as a JSON body on GET (ints), not in the query string (strings).
    assert [(r.method, r.endpoint, r.params.get("run_id")) for r in dbx.requests] == [
        ("GET", "jobs/runs/get", run_id),
        ("GET", "jobs/runs/get", run_id),
        ("GET", "jobs/runs/get", run_id),
        ("GET", "jobs/runs/get-output", run["tasks"][0]["run_id"]),
    ]


async def test_async_hook_retries_429(dbx: FakeDatabricks) -> None:
    dbx.simulate("nb", seconds=300)
    run_id = await asyncio.to_thread(_hook().submit_run, _notebook_run())
    await asyncio.to_thread(dbx.wait_until, run_id, "RUNNING")  # the fake's scheduler starts it
    dbx.fail_next("jobs/runs/get", 429, retry_after=1)
    async with _hook() as hook:
        assert (await hook.a_get_run_state(run_id)).life_cycle_state == "RUNNING"
    assert dbx.count("jobs/runs/get", status=429) == 1
    assert dbx.count("jobs/runs/get", status=200) == 1
    dbx.cancel(run_id)


# ----------------------------------------------------------------------------- OAuth M2M over TLS


def test_service_principal_oauth_over_tls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = _script(tmp_path, "print('oauth ok')\n")
    with (
        FakeDatabricks(token=TOKEN, tls=True, service_principals={"sp-client": "sp-secret"}) as dbx,
        dbx.trust_ca(),
    ):
        dbx.map_path(WS, tmp_path)
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json(oauth_client_id="sp-client"))
        assert json.loads(dbx.connection_json(oauth_client_id="sp-client"))["extra"] == {
            "service_principal_oauth": True
        }
        hook = _hook()
        run_id = hook.submit_run(_python_run(script))
        dbx.wait_until_terminal(run_id)
        assert hook.get_run_state(run_id).result_state == "SUCCESS"

        async def read_async() -> str:
            async with _hook() as async_hook:
                return (await async_hook.a_get_run_state(run_id)).result_state

        assert asyncio.run(read_async()) == "SUCCESS"
        # One token for the sync hook (cached across calls), one for the async hook instance.
        assert dbx.count("/oidc/v1/token", status=200) == 2
        assert dbx.count("jobs/runs/get", status=200) == 2

        monkeypatch.setenv(
            "AIRFLOW_CONN_BAD_SP", dbx.connection_json(oauth_client_id="sp-client").replace("sp-secret", "x")
        )
        with pytest.raises(AirflowException):
            _hook("bad_sp").get_run_state(run_id)
        assert dbx.count("/oidc/v1/token", status=401) >= 1


# ----------------------------------------------------------------------------- the provider's own operator


def test_databricks_submit_run_operator_runs_against_the_fake(dbx: FakeDatabricks, tmp_path: Path) -> None:
    from airflow.providers.databricks.operators.databricks import DatabricksSubmitRunOperator

    script = _script(tmp_path, "print('operator step')\n")
    operator = DatabricksSubmitRunOperator(
        task_id="spark_step",
        spark_python_task={"python_file": str(script), "parameters": ["1"]},
        new_cluster=dict(CLUSTER),
        polling_period_seconds=0,
        do_xcom_push=False,
        databricks_retry_args={"stop": stop_after_attempt(3), "wait": wait_none()},
    )
    operator.execute(context={})  # type: ignore[arg-type]
    (run_id,) = dbx.run_ids
    assert dbx.get_run(run_id)["state"]["result_state"] == "SUCCESS"
    assert dbx.calls["jobs/runs/submit"] == 1
    assert dbx.calls["jobs/runs/get"] >= 2  # get_run_page_url, then polling


async def test_deferrable_trigger_reports_the_failed_task_error(dbx: FakeDatabricks, tmp_path: Path) -> None:
    from airflow.providers.databricks.triggers.databricks import DatabricksExecutionTrigger

    script = _script(tmp_path, "raise RuntimeError('spark step exploded')\n")
    run_id = await asyncio.to_thread(_hook().submit_run, _python_run(script))
    trigger = DatabricksExecutionTrigger(
        run_id=run_id, databricks_conn_id="databricks_default", polling_period_seconds=1, retry_delay=0
    )
    event = await anext(trigger.run())

    assert json.loads(event.payload["run_state"])["result_state"] == "FAILED"
    assert event.payload["errors"] == [
        {"task_key": "step", "run_id": dbx.task_run_ids(run_id)["step"], "error": "RuntimeError: spark step exploded"}
    ]
    assert dbx.count("jobs/runs/get-output") == 1
    # Repair bookkeeping reads the run's history: one ORIGINAL entry, so no repair yet.
    assert await asyncio.to_thread(_hook().get_latest_repair_id, run_id) is None


def test_full_life_cycle_with_queue_and_cleanup_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeDatabricks(token=TOKEN, queued_seconds=0.3, pending_seconds=0.3, terminating_seconds=0.3) as dbx:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        dbx.simulate("nb", seconds=0.3)
        run_id = _hook().submit_run(_notebook_run())
        seen: list[tuple[str, str]] = []
        phases = {"QUEUED", "PENDING", "RUNNING", "TERMINATING", "TERMINATED"}
        while True:
            run = dbx.get_run(run_id)
            observed = (run["state"]["life_cycle_state"], run["status"]["state"])
            if not seen or seen[-1] != observed:
                seen.append(observed)
            if observed[0] == "TERMINATED":
                break
            dbx.wait_until(run_id, *(phases - {observed[0]}))
        order = ["QUEUED", "PENDING", "RUNNING", "TERMINATING", "TERMINATED"]
        # What this loop observes depends on its own speed (a loaded machine may poll past a 0.3 s
        # phase); the order never changes, and the run's own durations prove every phase took place.
        assert all(life == status for life, status in seen), seen
        assert [life for life, _ in seen] == [phase for phase in order if phase in {p for p, _ in seen}], seen
        assert seen[-1] == ("TERMINATED", "TERMINATED")
        assert run["setup_duration"] > 0 and run["execution_duration"] > 0 and run["cleanup_duration"] > 0


def test_cancel_before_the_cluster_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = _script(tmp_path, f"open({str(marker)!r}, 'w').close()\n")
    with FakeDatabricks(token=TOKEN, hold_pending=True) as dbx:
        dbx.map_path(WS, tmp_path)
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        hook = _hook()
        run_id = hook.submit_run(_python_run(script))
        dbx.wait_until(dbx.task_run_ids(run_id)["step"], "PENDING")
        hook.cancel_run(run_id)
        run = dbx.wait_until_terminal(run_id)
        dbx.release()
    assert run["state"]["result_state"] == "CANCELED"
    assert run["tasks"][0]["state"]["result_state"] == "CANCELED"
    assert not marker.exists()  # the script never ran


# ----------------------------------------------------------------------------- strict like the real service


@pytest.mark.parametrize("python_file", ["/tmp/worker/step.py", "file:/tmp/step.py", "step.py"])
def test_python_file_on_the_submitting_machine_is_refused(dbx: FakeDatabricks, hook: Any, python_file: str) -> None:
    with pytest.raises(DatabricksApiError) as raised:
        hook.submit_run(_python_run(python_file))
    assert raised.value.http_status_code == 400
    assert "INVALID_PARAMETER_VALUE" in str(raised.value) and "python_file" in str(raised.value)
    assert dbx.run_ids == []


def test_git_source_python_file_must_be_relative(dbx: FakeDatabricks, hook: Any) -> None:
    with pytest.raises(DatabricksApiError, match="relative"):
        hook.submit_run(_python_run("/Workspace/x.py", task={"spark_python_task": {
            "python_file": "/Workspace/x.py", "source": "GIT"}}))


def test_task_environment_is_minimal(dbx: FakeDatabricks, hook: Any, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBMITTER_SECRET", "must-not-leak")
    script = _script(tmp_path, "import os, json\nprint(json.dumps(sorted(os.environ)))\n")
    cluster = {**CLUSTER, "spark_env_vars": {"FROM_CLUSTER": "yes"}}
    run_id = hook.submit_run(_python_run(script, task={"new_cluster": cluster}))
    dbx.wait_until_terminal(run_id)
    names = json.loads(hook.get_run_output(dbx.task_run_ids(run_id)["step"])["logs"])
    assert "FROM_CLUSTER" in names and "DATABRICKS_RUNTIME_VERSION" in names
    assert "SUBMITTER_SECRET" not in names and "AIRFLOW_CONN_DATABRICKS_DEFAULT" not in names


def test_cancel_passes_through_terminating(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with FakeDatabricks(token=TOKEN, cancel_seconds=0.5) as dbx:
        dbx.map_path(WS, tmp_path)
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        hook = _hook()
        run_id = hook.submit_run(_python_run(_script(tmp_path, "import time\ntime.sleep(300)\n")))
        dbx.wait_until(run_id, "RUNNING")
        hook.cancel_run(run_id)
        # Asynchronous, as runs/cancel documents: the run is TERMINATING first, not at once CANCELED.
        assert hook.get_run(run_id)["state"]["life_cycle_state"] in ("RUNNING", "TERMINATING")
        run = dbx.wait_until(run_id, "TERMINATING")
        assert "result_state" not in run["state"]
        run = dbx.wait_until_terminal(run_id)
        assert run["state"]["result_state"] == "CANCELED"


# ----------------------------------------------------------------------------- the DBFS API


def _dbfs(hook: Any, method: str, name: str, **params: Any) -> Any:
    return hook._do_api_call((method, f"2.0/dbfs/{name}"), params)


def test_dbfs_put_read_status_and_delete(dbx: FakeDatabricks, hook: Any) -> None:
    import base64

    with pytest.raises(DatabricksApiError) as raised:
        _dbfs(hook, "GET", "get-status", path="/ml/x.json")
    assert raised.value.http_status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in str(raised.value)
    _dbfs(hook, "POST", "put", path="/ml/x.json", contents=base64.b64encode(b'{"a": 1}').decode(), overwrite=True)
    assert _dbfs(hook, "GET", "get-status", path="/ml/x.json")["file_size"] == 8
    answer = _dbfs(hook, "GET", "read", path="/ml/x.json", offset=0, length=4)
    assert answer == {"bytes_read": 4, "data": base64.b64encode(b'{"a"').decode()}
    assert dbx.dbfs_file("dbfs:/ml/x.json").read_bytes() == b'{"a": 1}'
    with pytest.raises(DatabricksApiError, match="RESOURCE_ALREADY_EXISTS"):
        _dbfs(hook, "POST", "put", path="/ml/x.json", contents="", overwrite=False)
    with pytest.raises(DatabricksApiError, match="MAX_READ_SIZE_EXCEEDED"):
        _dbfs(hook, "GET", "read", path="/ml/x.json", length=(1 << 20) + 1)
    _dbfs(hook, "POST", "delete", path="/ml/x.json")
    assert not dbx.dbfs_file("/ml/x.json").exists()


def test_dbfs_inline_put_is_limited_to_1_mb_and_streams_in_blocks(dbx: FakeDatabricks, hook: Any) -> None:
    import base64

    big = b"x" * ((1 << 20) + 1)
    with pytest.raises(DatabricksApiError, match="MAX_BLOCK_SIZE_EXCEEDED"):
        _dbfs(hook, "POST", "put", path="/big.bin", contents=base64.b64encode(big).decode(), overwrite=True)
    handle = _dbfs(hook, "POST", "create", path="/big.bin", overwrite=True)["handle"]
    with pytest.raises(DatabricksApiError, match="MAX_BLOCK_SIZE_EXCEEDED"):
        _dbfs(hook, "POST", "add-block", handle=handle, data=base64.b64encode(big).decode())
    for part in (big[: 1 << 20], big[1 << 20 :]):
        _dbfs(hook, "POST", "add-block", handle=handle, data=base64.b64encode(part).decode())
    _dbfs(hook, "POST", "close", handle=handle)
    assert dbx.dbfs_file("/big.bin").read_bytes() == big
    with pytest.raises(DatabricksApiError, match="RESOURCE_DOES_NOT_EXIST"):
        _dbfs(hook, "POST", "close", handle=handle)


# ----------------------------------------------------------------------------- fault knobs


def _quick_hook(timeout: int = 1, attempts: int = 1) -> Any:
    return DatabricksHook(timeout_seconds=timeout, retry_limit=attempts,
                          retry_args={"stop": stop_after_attempt(attempts), "wait": wait_none()})


def test_slow_submit_takes_effect_although_the_client_timed_out(dbx: FakeDatabricks, tmp_path: Path) -> None:
    dbx.slow_next("jobs/runs/submit", 3)
    with pytest.raises(AirflowException, match="(?i)timed? ?out"):
        _quick_hook().submit_run(_python_run(_script(tmp_path, "print(1)\n"), idempotency_token="slow-1"))
    assert len(dbx.run_ids) == 1  # the run exists
    # The same token answers the same run, without a second one.
    assert _quick_hook().submit_run(_python_run(_script(tmp_path, "print(1)\n"), idempotency_token="slow-1")) \
        == dbx.run_ids[0]
    assert len(dbx.run_ids) == 1


def test_lost_submit_response_still_created_the_run(dbx: FakeDatabricks, tmp_path: Path) -> None:
    dbx.drop_response_next("jobs/runs/submit")
    with pytest.raises(AirflowException):
        _quick_hook().submit_run(_python_run(_script(tmp_path, "print(1)\n")))
    assert len(dbx.run_ids) == 1


def test_outage_answers_503_for_its_duration(dbx: FakeDatabricks) -> None:
    dbx.outage(30)
    with pytest.raises(AirflowException, match="503"):
        _quick_hook().get_run_state(1)
    dbx.outage(0)
    with pytest.raises(DatabricksApiError, match="does not exist"):
        _quick_hook().get_run_state(1)


def test_rate_limit_answers_429_with_retry_after(dbx: FakeDatabricks) -> None:
    dbx.rate_limit(2, retry_after=7)
    for _ in range(2):
        response = requests.get(f"{dbx.url}/api/2.2/jobs/runs/list",
                                headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert response.status_code == 429 and response.headers["Retry-After"] == "7"
        assert response.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert requests.get(f"{dbx.url}/api/2.2/jobs/runs/list", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=10).status_code == 200


def test_revoked_token_is_refused_with_403_while_the_run_goes_on(dbx: FakeDatabricks, hook: Any,
                                                                  tmp_path: Path) -> None:
    run_id = hook.submit_run(_python_run(_script(tmp_path, "import time\ntime.sleep(300)\n")))
    dbx.wait_until(run_id, "RUNNING")
    dbx.revoke_token()
    with pytest.raises(DatabricksApiError) as raised:
        _quick_hook().get_run_state(run_id)
    assert raised.value.http_status_code == 403 and "Invalid access token" in str(raised.value)
    assert dbx.life_cycle_state(run_id) == "RUNNING"
    dbx.cancel(run_id)


def test_delete_run_cancels_then_forgets_it(dbx: FakeDatabricks, hook: Any, tmp_path: Path) -> None:
    run_id = hook.submit_run(_python_run(_script(tmp_path, "import time\ntime.sleep(300)\n")))
    dbx.wait_until(run_id, "RUNNING")
    process = dbx.process_of(run_id)
    dbx.delete_run(run_id)
    assert dbx.run_ids == [] and process is not None and process.poll() is not None
    with pytest.raises(DatabricksApiError, match="does not exist"):
        hook.get_run(run_id)


def test_driver_out_of_memory_fails_with_driver_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with FakeDatabricks(token=TOKEN, driver_memory_mb=64) as dbx:
        dbx.map_path(WS, tmp_path)
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        hook = _hook()
        script = _script(tmp_path, "import time\nhog = b'x' * (256 << 20)\ntime.sleep(300)\n")
        run_id = hook.submit_run(_python_run(script))
        run = dbx.wait_until_terminal(run_id, timeout=60)
        assert run["state"]["result_state"] == "FAILED"
        assert run["status"]["termination_details"]["code"] == "DRIVER_ERROR"
        assert "The spark driver has stopped unexpectedly" in run["state"]["state_message"]
        output = hook.get_run_output(dbx.task_run_ids(run_id)["step"])
        assert "The spark driver has stopped unexpectedly" in output["error"]


# ----------------------------------------------------------------------------- runs/list, as a shared query reads it


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Runs held PENDING (``hold_pending``): active for as long as a test needs, no process each."""
    with FakeDatabricks(token=TOKEN, hold_pending=True, cancel_seconds=0.05) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server


def _list(server: FakeDatabricks, version: str = "2.1", **params: Any) -> requests.Response:
    return requests.get(f"{server.url}/api/{version}/jobs/runs/list", params=params,
                        headers={"Authorization": f"Bearer {TOKEN}"})


def test_runs_list_limit_rules(held: FakeDatabricks) -> None:
    hook = _hook()
    runs = [hook.submit_run(_notebook_run(f"nb{i}")) for i in range(27)]
    # Default 25 in 2.1, 20 in 2.2; 0 means the maximum; above 25 is refused.
    assert len(_list(held).json()["runs"]) == 25
    assert len(_list(held, "2.2").json()["runs"]) == 20
    assert len(_list(held, limit=0).json()["runs"]) == 25
    for version in ("2.1", "2.2"):
        refused = _list(held, version, limit=26)
        assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert _list(held, limit=-1).status_code == 400
    assert _list(held, page_token="not-a-token").status_code == 400
    for run_id in runs:
        held.cancel(run_id)


def test_runs_list_pages_newest_first_with_tokens(held: FakeDatabricks) -> None:
    hook = _hook()
    runs = [hook.submit_run(_notebook_run(f"nb{i}")) for i in range(30)]
    seen: list[int] = []
    answer = _list(held, active_only="true", limit=25).json()
    assert "prev_page_token" not in answer
    while True:
        seen += [r["run_id"] for r in answer["runs"]]
        assert all("tasks" not in r and r["state"]["life_cycle_state"] == "PENDING" for r in answer["runs"])
        if not answer["has_more"]:
            assert "next_page_token" not in answer
            break
        answer = _list(held, active_only="true", limit=25, page_token=answer["next_page_token"]).json()
        assert "prev_page_token" in answer
    assert seen == list(reversed(runs))  # newest start first, each run once
    for run_id in runs:
        held.cancel(run_id)


def test_runs_list_active_only_is_every_non_terminal_state(held: FakeDatabricks) -> None:
    hook = _hook()
    runs = {state: hook.submit_run(_notebook_run()) for state in
            ("PENDING", "QUEUED", "BLOCKED", "WAITING_FOR_RETRY", "RUNNING", "TERMINATING",
             "SKIPPED", "INTERNAL_ERROR", "TERMINATED")}
    for state, run_id in runs.items():
        if state != "PENDING":
            held.force_state(run_id, state, "SUCCESS" if state == "TERMINATED" else None)
    deleted = hook.submit_run(_notebook_run())
    held.delete_run(deleted)
    active = {r["run_id"] for r in _list(held, active_only="true").json()["runs"]}
    completed = {r["run_id"] for r in _list(held, completed_only="true").json()["runs"]}
    terminal = {"SKIPPED", "INTERNAL_ERROR", "TERMINATED"}
    assert active == {run_id for state, run_id in runs.items() if state not in terminal}
    assert completed == {run_id for state, run_id in runs.items() if state in terminal}
    assert deleted not in active | completed
    for state, run_id in runs.items():
        if state not in terminal:
            held.clear_forced_state(run_id)
            held.cancel(run_id)


def test_outage_knob_ends_when_told(held: FakeDatabricks) -> None:
    held.outage(3600)
    assert held.outage_active
    down = _list(held)
    assert down.status_code == 503 and down.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    held.end_outage()
    assert not held.outage_active and _list(held).status_code == 200
