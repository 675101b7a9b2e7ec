"""The databricks backend against the Jobs API test server: what the contract suite does not cover.

Failures carry Databricks' error and trace, every odd state is handled, 429s wait for Retry-After,
auth problems name the connection, find() reattaches to finished runs, the runtime can live on DBFS,
and the trigger's async path speaks the hook's GET-with-JSON-body dialect.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.backends.databricks import DatabricksBackend
from airflow_remote_ml.core import (
    ArtifactStore,
    BackendAPIError,
    ConfigError,
    RunState,
    StepIdentity,
    StepRequest,
    StepSpec,
    TransientBackendError,
)
from airflow_remote_ml.core.wait import await_completion, failure_error, wait_for_completion
from tests.fakes.databricks_api import FakeDatabricks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "dapi-integration"
CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}
QUICK = {"poll_first_delay": 0.1, "poll_quick_delay": 0.2, "poll_quick_window": 60, "poll_cap": 0.5,
         "retry_delay": 0.05}


@pytest.fixture
def dbx(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDatabricks]:
    with FakeDatabricks(token=TOKEN) as server:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", server.connection_json())
        yield server


#: The runtime goes to DBFS through the DBFS API: the cluster cannot read a path on the Airflow worker.
RUNTIME_DIR = "dbfs:/airflow-remote-ml/runtime"


def make_backend(tmp_path: Path, **settings: Any) -> DatabricksBackend:
    return DatabricksBackend.from_config({"new_cluster": CLUSTER, "runtime_dir": RUNTIME_DIR,
                                          **QUICK, **settings})


def make_request(tmp_path: Path, task_id: str = "step", **spec: Any) -> StepRequest:
    identity = StepIdentity("dbx_it", task_id, f"run-{uuid.uuid4().hex[:10]}")
    return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(str(tmp_path / "artifacts")))


def run_to_end(backend: DatabricksBackend, request: StepRequest) -> tuple[Any, Any]:
    backend.validate(request)
    handle = backend.submit(request)
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 60)
    assert not outcome.timed_out
    return handle, outcome


def test_failed_user_file_reports_databricks_error_trace_and_run_page(dbx: FakeDatabricks, tmp_path: Path) -> None:
    script = dbx.put_file("dbfs:/jobs/features.py",
                          "print('reading input')\ndef load():\n    raise RuntimeError('bad partition 7')\nload()\n")
    backend = make_backend(tmp_path)
    request = make_request(tmp_path, command=["--day", "1"],
                           backend_options={"databricks": {"python_file": script}})
    handle, outcome = run_to_end(backend, request)
    assert outcome.status.state is RunState.FAILED
    error = failure_error(backend, handle, outcome.status, outcome.tail)
    text = str(error)
    assert "RuntimeError: bad partition 7" in text
    assert "Traceback (most recent call last)" in text  # error_trace from runs/get-output
    assert "reading input" in text  # the log tail
    assert handle.url and handle.url in text and f"/run/{handle.job_id}" in handle.url


def test_failed_runtime_step_reports_the_step_error_and_exit_code(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    request = make_request(tmp_path, command=["python3", "-c", "import sys; sys.exit(5)"], outputs=["x"])
    handle, outcome = run_to_end(backend, request)
    assert outcome.status.state is RunState.FAILED and outcome.status.exit_code == 5
    assert "exited with code 5" in outcome.status.message
    assert "Databricks: Python process exited with exit code 5." in outcome.status.message


@pytest.mark.parametrize(("forced", "expected"), [
    (("INTERNAL_ERROR", None, "cluster lost"), RunState.FAILED),
    (("SKIPPED", None, "already active"), RunState.FAILED),
    (("TERMINATED", "SUCCESS_WITH_FAILURES", ""), RunState.FAILED),
    (("TERMINATED", "CANCELED", "Run cancelled."), RunState.CANCELLED),
])
def test_forced_terminal_states(dbx: FakeDatabricks, tmp_path: Path, forced: tuple[Any, ...],
                                expected: RunState) -> None:
    backend = make_backend(tmp_path)
    request = make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(30)"])
    handle = backend.submit(request)
    dbx.force_state(int(handle.job_id), *forced)
    status = wait_for_completion(backend, handle, deadline=time.monotonic() + 30).status
    assert status.state is expected
    if forced[2]:
        assert forced[2] in status.message


def test_success_with_failures_accepted_when_configured(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path, success_with_failures_is_success=True)
    handle = backend.submit(make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(30)"]))
    dbx.force_state(int(handle.job_id), "TERMINATED", "SUCCESS_WITH_FAILURES")
    assert wait_for_completion(backend, handle, deadline=time.monotonic() + 30).status.is_successful


@pytest.mark.parametrize("state", ["BLOCKED", "WAITING_FOR_RETRY", "QUEUED", "SOME_FUTURE_STATE"])
def test_non_terminal_and_unknown_states_keep_waiting(dbx: FakeDatabricks, tmp_path: Path, state: str) -> None:
    backend = make_backend(tmp_path)
    handle = backend.submit(make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(30)"]))
    dbx.force_state(int(handle.job_id), state, status_state="RUNNING" if state == "SOME_FUTURE_STATE" else None)
    backend.poll(handle)  # the submit's own look-up, reused once
    status = backend.poll(handle)
    assert not status.is_terminal and status.remote_state == state
    dbx.clear_forced_state(int(handle.job_id))
    backend.cancel(handle)


def test_deleted_run_is_lost(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    handle, outcome = run_to_end(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))
    assert outcome.status.is_successful
    import requests

    requests.post(f"{dbx.url}/api/2.2/jobs/runs/delete", json={"run_id": int(handle.job_id)},
                  headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
    fresh = make_backend(tmp_path)
    assert fresh.poll(handle).state is RunState.LOST
    fresh.cancel(handle)  # cancelling a vanished run is not an error

    async def through_the_trigger_path() -> RunState:
        other = make_backend(tmp_path)
        await other.acancel(handle)
        return (await other.apoll(handle)).state

    assert asyncio.run(through_the_trigger_path()) is RunState.LOST


def test_429_waits_for_retry_after_inside_the_hook(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    handle = backend.submit(make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(30)"]))
    backend.poll(handle)  # the submit's own look-up, reused once
    dbx.reset_counts()
    dbx.fail_next("jobs/runs/get", 429, retry_after=1.5)
    assert backend.poll(handle).state in (RunState.QUEUED, RunState.RUNNING)
    first, second = dbx.requests[:2]
    assert (first.status, second.status) == (429, 200)
    assert second.timestamp - first.timestamp >= 1.4  # the hook alone would have waited retry_delay
    backend.cancel(handle)


def test_exhausted_retries_become_a_transient_error_with_retry_after(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path, retry_limit=2, max_retry_after=0.2)
    handle = backend.submit(make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(30)"]))
    backend.poll(handle)
    dbx.fail_next("jobs/runs/get", 429, retry_after=9, times=2)
    with pytest.raises(TransientBackendError) as caught:
        backend.poll(handle)
    assert caught.value.status_code == 429 and caught.value.retry_after == 9
    dbx.fail_next("jobs/runs/get", 503, times=2)
    with pytest.raises(TransientBackendError, match="TEMPORARILY_UNAVAILABLE"):
        backend.poll(handle)
    backend.cancel(handle)


def test_auth_errors_name_the_connection(dbx: FakeDatabricks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json(token="dapi-wrong"))
    with pytest.raises(BackendAPIError, match="databricks_default") as caught:
        make_backend(tmp_path).submit(make_request(tmp_path, command=["python3", "-c", "pass"]))
    assert caught.value.status_code == 403
    with pytest.raises(ConfigError, match="no_such_conn"):
        make_backend(tmp_path, databricks_conn_id="no_such_conn").find(StepIdentity("d", "t", "r"))


def test_find_reattaches_to_a_finished_run_and_resubmitting_never_duplicates(dbx: FakeDatabricks,
                                                                            tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    request = make_request(tmp_path, command=["python3", "-c", "print('{\"rows\": 3}')"], outputs=[])
    handle, outcome = run_to_end(backend, request)
    # Other runs in the workspace, newer than ours, on several pages.
    for i in range(30):
        make_backend(tmp_path).submit(make_request(tmp_path, task_id=f"other{i}", command=["python3", "-c", "pass"]))
    fresh = make_backend(tmp_path)
    found = fresh.find(request.identity)
    assert found is not None and found.job_id == handle.job_id
    assert found.data["manifest_uri"] == request.manifest_uri and found.url == handle.url
    assert fresh.fetch_result(found).metrics == {"rows": 3}
    again = fresh.submit(request)  # the same idempotency token: the same run
    assert again.job_id == handle.job_id
    assert len(dbx.run_ids) == 31


def test_runtime_uploaded_to_dbfs_through_a_mount(dbx: FakeDatabricks, tmp_path: Path) -> None:
    dbfs = tmp_path / "dbfs"
    dbx.map_path("dbfs:/", dbfs)
    backend = make_backend(tmp_path, runtime_dir="dbfs:/airflow-remote-ml/runtime",
                           local_mounts={"dbfs:/": str(dbfs)})
    request = make_request(tmp_path, command=["python3", "-c", "print('from dbfs runtime')"])
    handle, outcome = run_to_end(backend, request)
    assert outcome.status.is_successful, outcome.status
    submitted = dbx.get_run(int(handle.job_id))["tasks"][0]["spark_python_task"]["python_file"]
    assert submitted.startswith("dbfs:/airflow-remote-ml/runtime/remote_ml_runtime_v1_")
    assert (dbfs / submitted[len("dbfs:/"):]).is_file()
    assert "from dbfs runtime" in outcome.tail


def test_workspace_path_without_a_mount_is_a_config_error(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path, runtime_dir="/Volumes/main/ml/runtime")
    with pytest.raises(ConfigError, match="local_mounts"):
        backend.submit(make_request(tmp_path, command=["python3", "-c", "pass"]))


def test_streamed_logs_arrive_while_the_run_goes_on(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path, stream_logs=True)
    request = make_request(tmp_path, command=[
        "python3", "-c", "import time\nprint('early', flush=True)\ntime.sleep(30)"])
    handle = backend.submit(request)
    deadline = time.monotonic() + 20
    lines: list[str] = []
    cursor = None
    while "early" not in lines:
        assert time.monotonic() < deadline, lines
        time.sleep(0.2)
        assert not backend.poll(handle).is_terminal
        chunk = backend.read_logs(handle, cursor)
        lines += chunk.lines
        cursor = chunk.cursor
    assert backend.read_logs(handle, cursor).lines == []
    backend.cancel(handle)


def test_without_streaming_logs_cost_no_calls_until_the_end(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    request = make_request(tmp_path, command=["python3", "-c", "import time; print('x'); time.sleep(1)"])
    handle, outcome = run_to_end(backend, request)
    assert outcome.status.is_successful and "x" in outcome.tail
    calls = dbx.calls
    assert calls["jobs/runs/submit"] == 1 and calls["jobs/runs/get-output"] == 1
    assert calls["jobs/runs/get"] >= 2


def test_async_path_uses_the_hooks_async_methods(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    request = make_request(tmp_path, command=["python3", "-c", "print('async ok')"], outputs=[])
    handle = backend.submit(request)
    dbx.reset_counts()
    lines: list[str] = []
    outcome = asyncio.run(await_completion(backend, handle, on_line=lines.append,
                                           deadline=time.monotonic() + 60))
    assert outcome.status.is_successful and "async ok" in lines
    # aiohttp sends GET parameters as a JSON body (ints), the sync requests path as a query (strings).
    gets = [r for r in dbx.requests if r.endpoint == "jobs/runs/get"]
    assert gets and all(r.params["run_id"] == int(handle.job_id) for r in gets)

    slow = backend.submit(make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(60)"]))

    async def cancel_it() -> RunState:
        await backend.acancel(slow)
        await backend.acancel(slow)  # idempotent
        for _ in range(100):
            status = await backend.apoll(slow)
            if status.is_terminal:
                return status.state
            await asyncio.sleep(0.1)
        raise AssertionError("not cancelled")

    assert asyncio.run(cancel_it()) is RunState.CANCELLED


def test_notebook_exit_value_becomes_the_result(dbx: FakeDatabricks, tmp_path: Path) -> None:
    dbx.simulate("notebook_task", notebook_result=json.dumps({"metrics": {"auc": 0.91},
                                                              "outputs": {"report": "dbfs:/ml/report.json"}}))
    backend = make_backend(tmp_path, existing_cluster_id="0101-shared")
    request = make_request(tmp_path, command=["unused"], outputs=["report"],
                           backend_options={"databricks": {"task": "notebook_task", "notebook_path": "/Users/x/nb"}})
    handle, outcome = run_to_end(backend, request)
    assert outcome.status.is_successful
    result = backend.fetch_result(handle)
    assert result.metrics == {"auc": 0.91} and result.outputs == {"report": "dbfs:/ml/report.json"}


def test_manifest_watch_notices_the_end_with_few_api_calls(dbx: FakeDatabricks, tmp_path: Path) -> None:
    # The API's own schedule is set so far out that only the manifest can end this wait: the run's end is
    # noticed through the artifact store, not by a runs/get that happened to come at the right moment.
    backend = DatabricksBackend.from_config({"new_cluster": CLUSTER, "runtime_dir": RUNTIME_DIR,
                                             "poll_first_delay": 600, "poll_quick_delay": 600,
                                             "poll_cap": 600})
    request = make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(2)"])
    handle = backend.submit(request)
    dbx.reset_counts()
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 120)
    assert outcome.status.is_successful and not outcome.timed_out
    # The manifest's appearance costs one confirming read (and the submit's own read may stand in for the
    # first check): a handful of calls, not one per second.
    assert dbx.calls["jobs/runs/get"] <= 3, dbx.calls


def test_manifest_watch_still_notices_a_run_that_ends_without_one(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = DatabricksBackend.from_config({"new_cluster": CLUSTER, "runtime_dir": RUNTIME_DIR,
                                             "poll_first_delay": 0.2})
    handle = backend.submit(make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(60)"]))
    dbx.force_state(int(handle.job_id), "INTERNAL_ERROR", None, "driver lost")

    async def wait_async() -> Any:
        return await await_completion(backend, handle, deadline=time.monotonic() + 30)

    outcome = asyncio.run(wait_async())
    assert outcome.status.state is RunState.FAILED and "driver lost" in outcome.status.message


# -- exactly one run under an ambiguous submit ----------------------------------------------------------


def test_submit_is_idempotent_by_the_identity_token(dbx: FakeDatabricks, tmp_path: Path) -> None:
    assert DatabricksBackend.idempotent_submit is True
    backend = make_backend(tmp_path)
    request = make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(30)"])
    first = backend.submit(request)
    token = dbx.requests[[r.endpoint for r in dbx.requests].index("jobs/runs/submit")].params["idempotency_token"]
    assert token == request.identity.idempotency_token and len(token) <= 64
    # A second submit of the same identity (a retry after an ambiguous answer) adopts the same run.
    assert make_backend(tmp_path).submit(request).job_id == first.job_id
    assert dbx.run_ids == [int(first.job_id)]
    backend.cancel(first)


def test_slow_submit_past_the_client_timeout_makes_one_run(dbx: FakeDatabricks, tmp_path: Path) -> None:
    # The hook's own retry of the timed-out submit carries the same token: the existing run answers.
    backend = make_backend(tmp_path, request_timeout=1, retry_limit=3)
    dbx.slow_next("jobs/runs/submit", 3)
    request = make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(30)"])
    handle = backend.submit(request)
    assert dbx.run_ids == [int(handle.job_id)]
    assert dbx.count("jobs/runs/submit") >= 2
    backend.cancel(handle)


@pytest.mark.parametrize("fault", ["slow", "lost", "outage"])
def test_ambiguous_submit_is_transient_and_a_resubmit_adopts_the_run(dbx: FakeDatabricks, tmp_path: Path,
                                                                     fault: str) -> None:
    backend = make_backend(tmp_path, request_timeout=1, retry_limit=1)
    request = make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(30)"])
    if fault == "slow":
        dbx.slow_next("jobs/runs/submit", 3)
    elif fault == "lost":
        dbx.drop_response_next("jobs/runs/submit")
    else:
        dbx.outage(60)
    with pytest.raises(TransientBackendError, match="outcome unknown" if fault != "outage" else "UNAVAILABLE"):
        backend.submit(request)
    dbx.outage(0)
    created = dbx.run_ids  # slow and lost: the run exists; outage: nothing was served
    assert len(created) == (0 if fault == "outage" else 1)
    handle = make_backend(tmp_path).submit(request)
    assert dbx.run_ids == (created or [int(handle.job_id)]) and int(handle.job_id) == dbx.run_ids[0]
    found = make_backend(tmp_path).find(request.identity)
    assert found is not None and found.job_id == handle.job_id
    backend.cancel(handle)


# -- the run page link survives a throttled first read ---------------------------------------------------


def test_run_page_url_survives_a_429_on_the_first_read(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path, retry_limit=2, max_retry_after=0.1)
    dbx.fail_next("jobs/runs/get", 429, retry_after=5, times=2)
    request = make_request(tmp_path, command=["python3", "-c", "import sys; print('boom'); sys.exit(4)"])
    handle = backend.submit(request)
    assert handle.url and handle.job_id in handle.url and handle.url.startswith(dbx.url)
    assert json.loads(json.dumps(handle.to_json()))["url"] == handle.url
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 60)
    assert outcome.status.state is RunState.FAILED
    assert handle.url in str(failure_error(backend, handle, outcome.status, outcome.tail))


# -- dbfs:/ artifacts need the /dbfs mount on the cluster -----------------------------------------------


def test_dbfs_artifact_root_without_the_dbfs_mount_is_refused_before_submitting(
        dbx: FakeDatabricks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    backend = make_backend(tmp_path)
    request = StepRequest.create(StepSpec.build(command=["python3", "-c", "print(1)"], outputs=["model"]),
                                 StepIdentity("dbx_it", "step", "run-dbfs"), ArtifactStore("dbfs:/ml/artifacts"))
    with pytest.raises(ConfigError, match="artifact_root") as caught:
        backend.validate(request)
    assert "/Volumes/" in str(caught.value) and "dbfs_fuse" in str(caught.value)
    with pytest.raises(ConfigError, match="artifact_root"):
        backend.submit(request)
    assert dbx.run_ids == [] and dbx.count("jobs/runs/submit") == 0
    assert not list(tmp_path.rglob("dbfs:*")) and not Path("dbfs:").exists()
    inputs = StepRequest.create(StepSpec.build(command=["python3", "-c", "print(1)"],
                                               inputs={"data": "dbfs:/raw/data.csv"}),
                                StepIdentity("dbx_it", "step", "run-dbfs-in"), ArtifactStore(str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="inputs.data"):
        backend.validate(inputs)


def test_dbfs_manifest_is_read_through_the_dbfs_api(dbx: FakeDatabricks, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With dbfs_fuse (classic clusters), Airflow still reads dbfs:/ through the API, never as a local path."""
    monkeypatch.chdir(tmp_path)
    backend = make_backend(tmp_path, dbfs_fuse=True)
    big = {"protocol_version": 1, "status": "succeeded", "outputs": {}, "metrics": {"blob": "y" * (3 << 20)}}
    dbx.put_file("dbfs:/ml/m.json", json.dumps(big))
    assert backend.read_manifest("dbfs:/ml/m.json") == big  # 3 MB: several 1 MB reads
    assert dbx.count("dbfs/read") == 4
    assert backend.read_manifest("dbfs:/ml/missing.json") is None
    backend._write("dbfs:/ml/big.bin", b"z" * ((1 << 20) + 5))  # more than one inline put may carry
    assert dbx.dbfs_file("dbfs:/ml/big.bin").read_bytes() == b"z" * ((1 << 20) + 5)
    assert dbx.count("dbfs/add-block") == 2
    assert not list(tmp_path.rglob("dbfs:*"))


# -- the platform's reason reaches the status and the error ----------------------------------------------


def test_driver_oom_reaches_the_status_reason_with_message_log_tail_and_link(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeDatabricks(token=TOKEN, driver_memory_mb=64) as dbx:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        backend = make_backend(tmp_path)
        hog = "import time; print('loading the table', flush=True); hog = b'x' * (256 << 20); time.sleep(120)"
        handle, outcome = run_to_end(backend, make_request(tmp_path, command=["python3", "-c", hog]))
        assert outcome.status.state is RunState.FAILED
        assert outcome.status.reason == "DRIVER_ERROR"
        assert "The spark driver has stopped unexpectedly" in outcome.status.message
        assert "ran out of memory" in outcome.status.message
        text = str(failure_error(backend, handle, outcome.status, outcome.tail))
        assert "The spark driver has stopped unexpectedly" in text and handle.url in text
        assert "loading the table" in text  # the log tail


def test_timeout_and_internal_error_carry_their_reason(dbx: FakeDatabricks, tmp_path: Path) -> None:
    backend = make_backend(tmp_path, timeout_grace_seconds=0)
    handle, outcome = run_to_end(backend, make_request(
        tmp_path, command=["python3", "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                            "time.sleep(120)"], timeout=1))
    assert outcome.status.reason == "TIMEDOUT" and "timed out" in outcome.status.message
    handle = backend.submit(make_request(tmp_path, task_id="lost", command=["python3", "-c",
                                                                            "import time; time.sleep(60)"]))
    dbx.force_state(int(handle.job_id), "INTERNAL_ERROR", None, "Cluster 0101-x was terminated unexpectedly")
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 60)
    assert outcome.status.reason == "INTERNAL_ERROR"
    assert "Cluster 0101-x was terminated unexpectedly" in outcome.status.message


def test_find_adopts_the_oldest_of_several_runs_for_one_identity(dbx: FakeDatabricks, tmp_path: Path) -> None:
    from airflow.providers.databricks.hooks.databricks import DatabricksHook

    from airflow_remote_ml.backends.databricks import build_submit_payload

    backend = make_backend(tmp_path)
    request = make_request(tmp_path, command=["python3", "-c", "import time; time.sleep(60)"])
    first = backend.submit(request)
    # A run for the same identity without the token (submitted by an older version, or by hand): newer.
    payload = build_submit_payload(request, backend.config, backend.runtime_uri(request))
    payload.pop("idempotency_token")
    second = DatabricksHook().submit_run(payload)
    assert dbx.run_ids == sorted([int(first.job_id), second])
    for _ in range(2):  # deterministic: every caller adopts the same, oldest run
        found = make_backend(tmp_path).find(request.identity)
        assert found is not None and found.job_id == first.job_id
    dbx.cancel(second)
    backend.cancel(first)
