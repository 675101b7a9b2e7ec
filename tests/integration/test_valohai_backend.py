"""The valohai backend against a local server speaking the Valohai v0 API (tests/fakes/valohai_api.py).

Steps really run (as processes with Valohai's ``VH_*`` directories); these tests cover what the contract
suite does not: Valohai steps of a valohai.yaml, project lookup, field errors, bad tokens, retries,
paging in ``find``, reattachment, every end state, long logs, and outputs crossing to another backend.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.backends.local import LocalBackend
from airflow_remote_ml.backends.valohai import IDENTITY_TAG_PREFIX, LogCursor, ValohaiBackend
from airflow_remote_ml.core import (
    ArtifactError,
    ArtifactStore,
    ConfigError,
    InvalidRequestError,
    RunState,
    StepIdentity,
    StepRequest,
    StepSpec,
    TransientBackendError,
)
from airflow_remote_ml.core.wait import await_completion, failure_error, wait_for_completion
from tests.fakes.valohai_api import FakeValohai

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOKEN = "integration-token"
PY = shlex.quote(sys.executable)

TRAIN = """\
import json, os, sys
params = json.load(open(os.path.join(os.environ["VH_CONFIG_DIR"], "parameters.json")))
data_dir = os.path.join(os.environ["VH_INPUTS_DIR"], "dataset")
rows = sum(len(open(os.path.join(data_dir, f)).read().splitlines()) for f in sorted(os.listdir(data_dir)))
print("training with", json.dumps(params, sort_keys=True), "on", rows, "rows", flush=True)
print(json.dumps({"loss": 0.5, "rows": rows}), flush=True)
print(json.dumps({"loss": 0.25}), flush=True)
print("MODE=" + os.environ.get("MODE", "?"), flush=True)
out = os.environ["VH_OUTPUTS_DIR"]
open(os.path.join(out, "model.json"), "w").write(json.dumps({"alpha": params["alpha"], "rows": rows}))
"""

CONFIG: list[dict[str, Any]] = [
    {"step": {"name": "make-data", "image": "python:3.11",
              "command": "mkdir -p $VH_OUTPUTS_DIR/dataset && printf 'a\\nb\\n' > $VH_OUTPUTS_DIR/dataset/part1.csv"
                         " && printf 'c\\n' > $VH_OUTPUTS_DIR/dataset/part2.csv"}},
    {"step": {"name": "train", "image": "python:3.11", "command": f"{PY} train.py",
              "parameters": [{"name": "alpha", "type": "float", "default": 1.0},
                             {"name": "tags", "type": "string", "optional": True}],
              "inputs": [{"name": "dataset"}]}},
    {"step": {"name": "chatty", "image": "python:3.11",
              "command": f"{PY} -c 'import time\nfor i in range(30):\n    print(\"line\", i, flush=True)\n'"}},
    {"step": {"name": "sleep", "image": "python:3.11",
              "command": f"{PY} -c 'import time; print(\"sleeping\", flush=True); time.sleep(60)'"}},
    {"step": {"name": "quick", "image": "busybox", "command": "echo quick"}},
    {"step": {"name": "fail", "image": "python:3.11",
              "command": f"{PY} -c 'import sys; print(\"bad input row 7\", file=sys.stderr); sys.exit(3)'"}},
    {"step": {"name": "grow", "image": "python:3.11",
              "command": f"{PY} -c 'import time; x = b\"x\" * (512 << 20); time.sleep(60)'"}},
]


@pytest.fixture
def valohai(tmp_path: Path) -> Iterator[FakeValohai]:
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "train.py").write_text(TRAIN)
    with FakeValohai(token=TOKEN, stop_grace=1.0) as server:
        server.add_environment("fake-small-64m", memory_mib=64)
        server.add_project("demo", config=CONFIG, repository=repository)
        yield server


def make_backend(valohai: FakeValohai, **overrides: Any) -> ValohaiBackend:
    settings: dict[str, Any] = {"host": valohai.url, "token": TOKEN, "project": "demo", "branch": "main",
                                "profiles": {"gpu": {"environment": "fake-gpu-1x"}}, "max_retry_wait": 2}
    return ValohaiBackend.from_config({**settings, **overrides})


@pytest.fixture
def backend(valohai: FakeValohai) -> Iterator[ValohaiBackend]:
    backend = make_backend(valohai)
    yield backend
    backend.close()


def request(tmp_path: Path, step: str, *, task_id: str = "train", **spec: Any) -> StepRequest:
    options = spec.pop("options", {})
    spec = {"callable": "example_ml.steps:train", "backend_options": {"valohai": {"step": step, **options}},
            **spec}
    identity = StepIdentity("valohai-it", task_id, f"run-{uuid.uuid4().hex[:10]}")
    return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(str(tmp_path / "artifacts")))


def run(backend: Any, req: StepRequest):
    backend.validate(req)
    handle = backend.submit(req)
    lines: list[str] = []
    outcome = wait_for_completion(backend, handle, on_line=lines.append, deadline=time.monotonic() + 120)
    assert not outcome.timed_out
    return handle, outcome, lines


def make_dataset(backend: ValohaiBackend, tmp_path: Path) -> str:
    handle, outcome, _ = run(backend, request(tmp_path, "make-data", task_id="data", outputs=["dataset"]))
    assert outcome.status.is_successful, outcome
    return backend.fetch_result(handle).outputs["dataset"]


# -- a Valohai step from the step spec ----------------------------------------------------------------------


def test_a_valohai_step_gets_params_inputs_env_profile_and_returns_datums_and_metadata(backend, valohai, tmp_path):
    dataset = make_dataset(backend, tmp_path)
    assert dataset.count("datum://") == 2  # a directory output: one datum per file

    req = request(tmp_path, "train", params={"alpha": 0.5, "tags": ["a", {"b": 1}]}, inputs={"dataset": dataset},
                  outputs=["model"], env={"MODE": "fast"}, resources={"profile": "gpu"}, timeout=600)
    handle, outcome, lines = run(backend, req)

    assert outcome.status.state is RunState.SUCCEEDED
    execution = valohai.execution(handle.job_id)
    assert execution["parameters"] == {"alpha": 0.5, "tags": '["a", {"b": 1}]'}
    assert execution["environment"]["slug"] == "fake-gpu-1x"
    assert execution["time_limit"] == 600
    assert f"{IDENTITY_TAG_PREFIX}{req.identity.digest}" in execution["tags"]
    assert handle.url == execution["urls"]["display"]
    assert any(line.startswith("training with") and "on 3 rows" in line for line in lines), lines
    assert "MODE=fast" in lines
    result = backend.fetch_result(handle)
    model = valohai.data[result.outputs["model"].removeprefix("datum://")]
    assert model.name == "model.json" and json.loads(open(model.path).read()) == {"alpha": 0.5, "rows": 3}
    assert result.metrics == {"loss": 0.25, "rows": 3}  # cumulative: the last value of each key
    assert result.manifest["execution"]["step"] == "train"
    assert "X-Amz" not in json.dumps(result.to_xcom())


def test_a_datum_output_feeds_a_valohai_step_and_an_exported_one_feeds_another_backend(valohai, tmp_path):
    exporting = make_backend(valohai, export_outputs=True)
    try:
        handle, outcome, _ = run(exporting, request(tmp_path, "make-data", task_id="data", outputs=["dataset"]))
        assert outcome.status.is_successful
        exported = exporting.fetch_result(handle)
    finally:
        exporting.close()
    folder = exported.outputs["dataset"]
    assert sorted(os.listdir(folder)) == ["part1.csv", "part2.csv"]
    assert exported.manifest["outputs"]["dataset"]["datum"].count("datum://") == 2

    # The exported copy lives under the artifact root, so a step on the local backend reads it.
    local = LocalBackend.from_config({"state_dir": str(tmp_path / "local-state")})
    identity = StepIdentity("valohai-it", "count", "run-1")
    spec = StepSpec.build(command=["python3", "-c", "import os; d = os.environ['REMOTE_ML_INPUT_DATASET']; "
                                   "print(sum(len(open(os.path.join(d, f)).read().split()) for f in os.listdir(d)))"],
                          inputs={"dataset": folder})
    local_handle, local_outcome, lines = run(local, StepRequest.create(spec, identity,
                                                                      ArtifactStore(str(tmp_path / "artifacts"))))
    assert local_outcome.status.is_successful and "3" in lines


def test_a_declared_output_the_step_did_not_write_is_an_artifact_error_naming_it(backend, tmp_path):
    handle, outcome, _ = run(backend, request(tmp_path, "quick", outputs=["model"]))
    assert outcome.status.is_successful
    with pytest.raises(ArtifactError, match="'model'"):
        backend.fetch_result(handle)


# -- configuration errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "field"), [
    ({"options": {"environment": "no-such-machine"}}, "valohai.environment"),
    ({"params": {"no_such_param": 1}}, "valohai.parameters"),
    ({"options": {"commit": "no-such-branch"}}, "valohai.commit"),
])
def test_a_refused_field_is_a_config_error_naming_it(backend, valohai, tmp_path, spec, field):
    req = request(tmp_path, "quick", **spec)
    with pytest.raises(ConfigError) as err:
        backend.submit(req)
    assert err.value.field == field
    assert not valohai.executions


def test_a_parameter_of_the_wrong_type_for_valohai_yaml_is_refused_before_the_create(backend, valohai, tmp_path):
    """Issue 9, item 4: the step's valohai.yaml declares alpha a float. As valohai-cli does, the backend reads
    the commit's configuration (?include=config) and refuses the value before anything is created."""
    req = request(tmp_path, "train", params={"alpha": "abc"}, inputs={"dataset": "https://example.com/d.csv"})
    backend.validate(req)  # nothing in the spec says alpha must be a number
    with pytest.raises(ConfigError) as err:
        backend.submit(req)
    assert err.value.field == "parameters.alpha" and "'abc' is not a number" in str(err.value)
    assert "float" in (err.value.fix or "")
    assert valohai.count("POST", "/api/v0/executions/") == 0
    options_req = request(tmp_path, "train", options={"parameters": {"alpha": [1.0, 2.0]}},
                          inputs={"dataset": "https://example.com/d.csv"})
    with pytest.raises(ConfigError) as err:
        backend.submit(options_req)
    assert err.value.field == "backend_options.valohai.parameters.alpha" and "single value" in str(err.value)
    assert valohai.count("GET", "/api/v0/commits/{id}/") == 1  # the configuration is read once per commit


def test_a_parameter_type_only_valohai_knows_fails_once_as_an_invalid_request(backend, valohai, tmp_path):
    """When the configuration cannot be read, the platform's own 400 names the field; sent once, never retried."""
    req = request(tmp_path, "train", params={"alpha": "abc"}, inputs={"dataset": "https://example.com/d.csv"})
    commit = next(iter(valohai.commits.values()))
    valohai.inject_fault(503, method="GET", path=f"/api/v0/commits/{commit.id}/")
    with pytest.raises(InvalidRequestError) as err:
        backend.submit(req)
    assert isinstance(err.value, ConfigError) and err.value.status_code == 400
    assert err.value.field == "valohai.parameters" and "abc is not a floating-point number" in str(err.value)
    assert valohai.count("POST", "/api/v0/executions/") == 1 and not valohai.executions  # sent once, not retried


def test_an_unknown_step_names_the_step_field(backend, tmp_path):
    with pytest.raises(ConfigError, match="valohai.step"):
        backend.submit(request(tmp_path, "no-such-step"))


def test_a_bad_token_names_the_connection(valohai, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_VALOHAI_IT", json.dumps({
        "conn_type": "valohai", "host": valohai.url, "password": "wrong-token",
        "extra": {"project": "demo", "branch": "main"}}))
    bad = ValohaiBackend.from_config({"conn_id": "valohai_it"})
    with pytest.raises(ConfigError, match="check the Valohai API token in connection 'valohai_it'"):
        bad.submit(request(tmp_path, "quick"))
    assert "wrong-token" not in json.dumps(bad.config_json())


def test_a_connection_configures_the_backend(valohai, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_VALOHAI_IT", json.dumps({
        "conn_type": "valohai", "host": valohai.url, "password": TOKEN,
        "extra": {"project": "fake-org/demo", "branch": "main", "steps": {"example_ml.steps:train": "quick"}}}))
    from_conn = ValohaiBackend.from_config({"conn_id": "valohai_it"})
    req = request(tmp_path, "ignored")
    req = StepRequest.create(StepSpec.build(callable="example_ml.steps:train"), req.identity,
                             ArtifactStore(str(tmp_path / "artifacts")))
    handle, outcome, lines = run(from_conn, req)
    assert outcome.status.is_successful and "quick" in lines
    assert from_conn.config_json()["token"] is None


def test_a_project_is_found_by_name_owner_and_name_or_id(valohai, tmp_path):
    project_id = next(iter(valohai.projects))
    for name in ("demo", "fake-org/demo", project_id):
        b = make_backend(valohai, project=name)
        assert b.project_id() == project_id
    with pytest.raises(ConfigError, match="no Valohai project 'other-org/demo'"):
        make_backend(valohai, project="other-org/demo").project_id()


# -- retries, reattachment, find ---------------------------------------------------------------------------


def test_throttled_reads_are_retried_and_a_failed_create_is_never_resent(backend, valohai, tmp_path):
    valohai.inject_fault(429, retry_after=1, path="/api/v0/projects/")
    valohai.inject_fault(503, count=1, method="POST", path="/api/v0/executions/")
    with pytest.raises(TransientBackendError) as err:
        backend.submit(request(tmp_path, "quick"))
    assert err.value.status_code == 503
    assert valohai.count("POST", "/api/v0/executions/") == 1 and not valohai.executions
    handle, outcome, _ = run(backend, request(tmp_path, "quick"))
    assert outcome.status.is_successful


def test_a_create_slower_than_the_client_timeout_is_ambiguous_and_found_by_identity(valohai, tmp_path):
    """Before: the backend looked the tag up at once, found nothing yet, and posted again (two executions)."""
    impatient = make_backend(valohai, request_timeout=1)
    req = request(tmp_path, "quick")
    valohai.slow_create(5)
    with pytest.raises(TransientBackendError):
        impatient.submit(req)
    assert valohai.count("POST", "/api/v0/executions/") == 1
    found = impatient.find(req.identity)
    assert found is not None and [found.job_id] == list(valohai.executions)
    assert ValohaiBackend.idempotent_submit is False
    assert ValohaiBackend.create_settle_seconds > 60 >= impatient.settings.request_timeout


def test_a_create_that_commits_after_the_timeout_is_never_posted_twice(valohai, tmp_path):
    """Issue 8.1: the look-up right after the timeout finds nothing yet. Before: the backend then posted
    again, and both requests landed (two executions with one identity tag)."""
    impatient = make_backend(valohai, request_timeout=1)
    req = request(tmp_path, "quick")
    valohai.slow_create(3, commit_late=True)
    with pytest.raises(TransientBackendError):
        impatient.submit(req)
    assert impatient.find(req.identity) is None  # not visible yet: only create_settle_seconds tells
    deadline = time.monotonic() + 60
    while (found := impatient.find(req.identity)) is None:
        assert time.monotonic() < deadline, "the slow create never became visible"
        time.sleep(0.2)
    assert [found.job_id] == list(valohai.executions)
    assert valohai.count("POST", "/api/v0/executions/") == 1


def test_a_lost_create_response_is_ambiguous_and_found_by_identity(backend, valohai, tmp_path):
    req = request(tmp_path, "quick")
    valohai.lose_create_response()
    with pytest.raises(TransientBackendError):
        backend.submit(req)
    found = backend.find(req.identity)
    assert found is not None and [found.job_id] == list(valohai.executions)
    assert valohai.count("POST", "/api/v0/executions/") == 1


def test_find_adopts_the_oldest_of_executions_sharing_an_identity(backend, valohai, tmp_path):
    """Before: find returned the newest match, so a second look-up could adopt the duplicate."""
    req = request(tmp_path, "quick")
    first, second = backend.submit(req), backend.submit(req)
    for execution in list(valohai.executions):
        valohai.wait(execution)
    assert valohai.execution(first.job_id)["counter"] < valohai.execution(second.job_id)["counter"]
    assert {make_backend(valohai).find(req.identity).job_id for _ in range(3)} == {first.job_id}


def test_a_request_timeout_beyond_the_settle_window_is_refused(valohai, tmp_path):
    with pytest.raises(ConfigError) as err:
        make_backend(valohai, request_timeout=300).validate(request(tmp_path, "quick"))
    assert err.value.field == "backend_config[valohai].request_timeout"


def test_a_new_worker_finds_the_execution_by_its_identity_tag_across_pages(valohai, tmp_path):
    with FakeValohai(token=TOKEN, page_size=2) as small_pages:
        small_pages.add_project("demo", config=CONFIG)
        first = make_backend(small_pages)
        wanted = request(tmp_path, "quick", task_id="wanted")
        handle = first.submit(wanted)
        for i in range(5):
            first.submit(request(tmp_path, "quick", task_id=f"other{i}"))
        for ex in list(small_pages.executions):
            small_pages.wait(ex)
        restarted = make_backend(small_pages, find_page_size=2)
        found = restarted.find(wanted.identity)
        assert found is not None and found.job_id == handle.job_id
        assert found.data["declared_outputs"] == [] and found.data["mode"] == "step"
        assert restarted.find(StepIdentity("valohai-it", "never", "run")) is None
        assert small_pages.count("GET", "/api/v0/executions/") == 6  # 3 pages per look-up


def test_reattach_to_a_queued_execution_then_follow_it_to_the_end(valohai, tmp_path):
    valohai.pause_queue()
    first = make_backend(valohai)
    req = request(tmp_path, "quick", outputs=[])
    handle = first.submit(req)
    restarted = make_backend(valohai)
    found = restarted.find(req.identity)
    assert found is not None and found.job_id == handle.job_id
    assert restarted.poll(found).state is RunState.QUEUED
    valohai.resume_queue()
    outcome = wait_for_completion(restarted, found, deadline=time.monotonic() + 60)
    assert outcome.status.is_successful and len(valohai.executions) == 1


# -- end states -------------------------------------------------------------------------------------------


def test_cancel_a_queued_execution_is_idempotent(backend, valohai, tmp_path):
    valohai.pause_queue()
    handle = backend.submit(request(tmp_path, "sleep"))
    backend.cancel(handle)
    valohai.wait(handle.job_id)
    assert backend.poll(handle).state is RunState.CANCELLED
    backend.cancel(handle)
    assert valohai.execution(handle.job_id)["status"] == "stopped"


def test_a_time_limit_fails_the_step_and_says_why(backend, tmp_path):
    handle, outcome, _ = run(backend, request(tmp_path, "sleep", timeout=1))
    assert outcome.status.state is RunState.FAILED
    assert "Time limit exceeded" in str(failure_error(backend, handle, outcome.status, outcome.tail))


def test_a_crash_is_a_lost_job_whose_reason_is_crashed(backend, valohai, tmp_path):
    handle = backend.submit(request(tmp_path, "sleep"))
    valohai.wait_status(handle.job_id, "started")
    valohai.crash(handle.job_id, "The worker machine was lost.")
    status = backend.poll(handle)
    assert status.state is RunState.LOST and status.remote_state == "crashed"
    assert status.reason == "crashed" and "The worker machine was lost." in status.message


def test_a_failed_step_says_error_with_its_exit_code_and_log_tail(backend, tmp_path):
    """Before: no reason and no exit code (Valohai's execution object has no exit-code field)."""
    handle, outcome, _ = run(backend, request(tmp_path, "fail"))
    status = outcome.status
    assert status.state is RunState.FAILED and status.reason == "error" and status.exit_code == 3
    error = failure_error(backend, handle, status, outcome.tail)
    assert error.exit_code == 3 and "bad input row 7" in error.log_tail and error.url == handle.url


def test_an_oom_kill_fails_with_the_platform_words(backend, tmp_path):
    handle, outcome, _ = run(backend, request(tmp_path, "grow", options={"environment": "fake-small-64m"}))
    status = outcome.status
    assert status.state is RunState.FAILED and status.reason == "error"
    assert "Out of memory" in status.message and status.exit_code == 137


def test_a_stop_sets_the_reason_stopped(backend, valohai, tmp_path):
    handle = backend.submit(request(tmp_path, "sleep"))
    valohai.wait_status(handle.job_id, "started")
    backend.cancel(handle)
    valohai.wait(handle.job_id)
    status = backend.poll(handle)
    assert status.state is RunState.CANCELLED and status.reason == "stopped"


def test_a_token_revoked_mid_run_is_a_config_error_naming_the_token(backend, valohai, tmp_path):
    handle = backend.submit(request(tmp_path, "sleep"))
    valohai.revoke_token()
    with pytest.raises(ConfigError, match="refused the API token"):
        backend.poll(handle)


def test_an_execution_deleted_remotely_is_lost(backend, valohai, tmp_path):
    handle = backend.submit(request(tmp_path, "sleep"))
    valohai.wait_status(handle.job_id, "started")
    valohai.delete_execution(handle.job_id)
    status = backend.poll(handle)
    assert status.state is RunState.LOST and "no longer exists" in status.message
    assert backend.find(request(tmp_path, "sleep").identity) is None


# -- inputs are URLs --------------------------------------------------------------------------------------


# A relative path is refused earlier still, by StepSpec itself (tests/unit/test_validation.py).
@pytest.mark.parametrize("uri", ["/data/train.csv", "file:///data/train.csv", "ftp://h/x"])
def test_an_input_valohai_cannot_download_is_a_config_error_before_submit(backend, valohai, tmp_path, uri):
    """Before: accepted, and the project's own double read the worker's local file."""
    req = request(tmp_path, "train", inputs={"dataset": uri})
    with pytest.raises(ConfigError) as err:
        backend.validate(req)
    assert err.value.field == "inputs.dataset" and "datum://" in err.value.fix
    assert not valohai.executions and valohai.count("POST", "/api/v0/executions/") == 0


def test_the_api_refuses_a_local_path_input_as_a_field_error(backend, valohai, tmp_path):
    req = request(tmp_path, "train", inputs={"dataset": str(tmp_path / "train.csv")})
    with pytest.raises(ConfigError) as err:
        backend.submit(req)  # validate() skipped: the API's own 400 names the field
    assert err.value.field == "valohai.inputs" and "Enter a valid URL." in str(err.value)
    assert not valohai.executions


def test_export_outputs_accepts_a_rendered_template_and_refuses_nonsense(backend, tmp_path):
    backend.validate(request(tmp_path, "quick", options={"export_outputs": "False"}))
    with pytest.raises(ConfigError, match="export_outputs"):
        backend.validate(request(tmp_path, "quick", options={"export_outputs": "sometimes"}))


def test_an_unknown_status_keeps_waiting_with_a_warning(backend, valohai, tmp_path, caplog):
    handle = backend.submit(request(tmp_path, "quick"))
    valohai.wait(handle.job_id)
    valohai.override_status(handle.job_id, "migrating")
    with caplog.at_level(logging.WARNING):
        status = backend.poll(handle)
    assert not status.is_terminal and status.remote_state == "migrating"
    assert "migrating" in caplog.text
    valohai.override_status(handle.job_id, None)
    assert backend.poll(handle).state is RunState.SUCCEEDED


# -- logs ------------------------------------------------------------------------------------------------


def test_long_logs_arrive_once_and_in_order_with_small_event_pages(valohai, tmp_path):
    small = make_backend(valohai, log_batch=4)
    handle = small.submit(request(tmp_path, "chatty"))
    lines: list[str] = []
    outcome = asyncio.run(await_completion(small, handle, on_line=lines.append, deadline=time.monotonic() + 60))
    assert outcome.status.is_successful
    assert [line for line in lines if line.startswith("line ")] == [f"line {i}" for i in range(30)]
    assert LogCursor.from_json(outcome.cursor).shown == len(valohai.executions[handle.job_id].events)
    assert small.read_logs(handle, json.loads(json.dumps(outcome.cursor))).lines == []
    assert small.log_tail(handle, 3)[-1].startswith("[valohai]")


def test_a_late_event_reaches_the_log_once(backend, valohai, tmp_path):
    handle = backend.submit(request(tmp_path, "sleep"))
    valohai.wait_status(handle.job_id, "started")
    lines: list[str] = []
    cursor = None
    deadline = time.monotonic() + 60
    while "sleeping" not in lines:
        assert time.monotonic() < deadline, lines
        chunk = backend.read_logs(handle, cursor)
        lines += chunk.lines
        cursor = chunk.cursor
    valohai.late_event(handle.job_id, "stderr", "shipped late", seconds_ago=30)
    lines += backend.read_logs(handle, cursor).lines
    backend.cancel(handle)
    valohai.wait(handle.job_id)
    lines += backend.read_logs(handle, json.loads(json.dumps(backend.read_logs(handle, cursor).cursor))).lines
    assert lines.count("shipped late") == 1 and lines.count("sleeping") == 1
    assert len(lines) == len(set(lines)), lines


def test_a_branch_runs_its_newest_commit_and_fetch_reveals_a_new_push(valohai, tmp_path):
    project_id = next(iter(valohai.projects))
    newer = [{"step": {"name": "quick", "image": "busybox", "command": "echo newer"}}]
    pushed = valohai.add_commit(project_id, newer, ref="main", fetched=False)
    without_fetch = make_backend(valohai)
    _, _, lines = run(without_fetch, request(tmp_path, "quick"))
    assert "quick" in lines  # the pushed commit is not known to Valohai yet
    fetching = make_backend(valohai, fetch=True)
    handle, _, lines = run(fetching, request(tmp_path, "quick"))
    assert "newer" in lines
    assert valohai.execution(handle.job_id)["commit"]["identifier"] == pushed["identifier"]
    with pytest.raises(ConfigError, match="no commit on branch 'nope'"):
        make_backend(valohai, branch="nope").submit(request(tmp_path, "quick"))


# -- deferred waits share one list per project ----------------------------------------------------------


def test_deferred_waits_share_one_list_and_ask_only_for_executions_that_left_it(valohai, tmp_path):
    """Before: every deferred step polled its own execution (and its log) once per period: linear in N."""
    count = 6
    valohai.pause_queue()
    backends = [make_backend(valohai, shared_watch_from=count) for _ in range(count)]
    handles = [b.submit(request(tmp_path, "quick", task_id=f"step{i}")) for i, b in enumerate(backends)]
    def own(job_id: str, suffix: str = "/") -> int:
        return sum(1 for _, path, _ in valohai.request_log if path == f"/api/v0/executions/{job_id}{suffix}")

    async def main() -> list[Any]:
        waits = [asyncio.create_task(await_completion(b, h, deadline=time.monotonic() + 120))
                 for b, h in zip(backends, handles, strict=True)]
        deadline = time.monotonic() + 60
        while not all(b._watching and b._watching[h.job_id][0].listed_at for b, h in zip(backends, handles,
                                                                                       strict=True)):
            assert time.monotonic() < deadline, "the shared list never started"
            await asyncio.sleep(0.05)
        before = {h.job_id: (own(h.job_id), own(h.job_id, "/events/")) for h in handles}
        valohai.resume_queue()
        outcomes = await asyncio.gather(*waits)
        for b in backends:
            await b.aclose()
        return [before, outcomes]

    before, outcomes = asyncio.run(main())
    assert all(o.status.is_successful for o in outcomes)
    for h in handles:
        gets, event_reads = before[h.job_id]
        # Once sharing: at most one GET of its own still in flight, then the one after it left the list;
        # its final log came with that GET.
        assert own(h.job_id) - gets <= 2, (own(h.job_id), gets)
        assert own(h.job_id, "/events/") - event_reads <= 1
    assert valohai.count("GET", "/api/v0/executions/") >= 1  # the list
    assert valohai.ignored_filters["status"] == 0


def test_few_deferred_waits_poll_their_own_execution_with_its_log(valohai, tmp_path):
    b = make_backend(valohai)  # shared_watch_from=4: one waiter alone polls its execution itself
    handle = b.submit(request(tmp_path, "chatty"))
    lines: list[str] = []

    async def main():
        try:
            return await await_completion(b, handle, on_line=lines.append, deadline=time.monotonic() + 60)
        finally:
            await b.aclose()

    outcome = asyncio.run(main())
    assert outcome.status.is_successful
    assert [line for line in lines if line.startswith("line ")] == [f"line {i}" for i in range(30)]
    assert valohai.count("GET", "/api/v0/executions/") == 0  # no list for a lone waiter
