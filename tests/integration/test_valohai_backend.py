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
from airflow_remote_ml.backends.valohai import IDENTITY_TAG_PREFIX, ValohaiBackend
from airflow_remote_ml.core import (
    ArtifactError,
    ArtifactStore,
    ConfigError,
    RunState,
    StepIdentity,
    StepRequest,
    StepSpec,
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
]


@pytest.fixture
def valohai(tmp_path: Path) -> Iterator[FakeValohai]:
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "train.py").write_text(TRAIN)
    with FakeValohai(token=TOKEN, stop_grace=1.0) as server:
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


def test_throttling_and_server_errors_are_retried(backend, valohai, tmp_path):
    valohai.inject_fault(429, retry_after=1, path="/api/v0/projects/")
    valohai.inject_fault(503, count=2, method="POST", path="/api/v0/executions/")
    handle, outcome, _ = run(backend, request(tmp_path, "quick"))
    assert outcome.status.is_successful
    assert len(valohai.executions) == 1  # retried creation made no duplicate
    assert valohai.count("POST", "/api/v0/executions/") == 3


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
        restarted = make_backend(small_pages)
        found = restarted.find(wanted.identity)
        assert found is not None and found.job_id == handle.job_id
        assert found.data["declared_outputs"] == [] and found.data["mode"] == "step"
        assert restarted.find(StepIdentity("valohai-it", "never", "run")) is None
        assert small_pages.count("GET", "/api/v0/executions/") > 3  # it paged


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


def test_a_crash_is_a_lost_job(backend, valohai, tmp_path):
    handle = backend.submit(request(tmp_path, "sleep"))
    valohai.wait_status(handle.job_id, "started")
    valohai.crash(handle.job_id)
    status = backend.poll(handle)
    assert status.state is RunState.LOST and status.remote_state == "crashed"


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
    assert outcome.cursor == len(valohai.executions[handle.job_id].events)
    assert small.read_logs(handle, outcome.cursor).lines == []
    assert small.log_tail(handle, 3)[-1].startswith("[valohai]")


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
