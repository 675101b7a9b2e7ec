"""Unit tests of the valohai backend's pure parts: status table, request building, log cursor, output
matching, error mapping and retries (against canned responses: no network)."""

from __future__ import annotations

import json
import logging
from collections import deque
from typing import Any

import pytest
import requests

from airflow_remote_ml.backends.valohai import (
    BOOTSTRAP,
    CURSOR_WINDOW,
    HANDLE_ENV,
    IDENTITY_TAG_PREFIX,
    MANIFEST_NAME,
    LogCursor,
    ValohaiAPI,
    ValohaiBackend,
    ValohaiConfig,
    build_execution,
    event_id,
    event_line,
    identity_tags,
    input_urls,
    map_status,
    match_outputs,
    new_events,
    param_value,
)
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
from airflow_remote_ml.valohai_hook import ValohaiHook, config_from_connection_fields

IDENTITY = StepIdentity("ml", "train", "manual__2026-01-01", map_index=2, generation=1)


def make_request(tmp_path, **spec: Any) -> StepRequest:
    spec.setdefault("callable", "example_ml.steps:train")
    return StepRequest.create(StepSpec.build(**spec), IDENTITY, ArtifactStore(str(tmp_path)))


def config(**overrides: Any) -> ValohaiConfig:
    base: dict[str, Any] = {"token": "t", "project": "demo", "branch": "main"}
    return ValohaiConfig(**{**base, **overrides})


def response(status: int, body: Any = None, headers: dict[str, str] | None = None, text: str | None = None,
             url: str = "https://vh.example/api/v0/executions/") -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.url = url
    resp.headers.update(headers or {})
    if text is not None:
        resp._content = text.encode()
    elif body is not None:
        resp._content = json.dumps(body).encode()
        resp.headers.setdefault("Content-Type", "application/json")
    else:
        resp._content = b""
    return resp


class CannedSession(requests.Session):
    """Answers each request with the next canned response and records what was asked."""

    def __init__(self, answers: list[requests.Response]) -> None:
        super().__init__()
        self.answers = deque(answers)
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method, url, params=None, json=None, timeout=None, **kwargs):  # type: ignore[override]
        self.calls.append((method, url, params))
        return self.answers.popleft()


def api_with(answers: list[requests.Response], **kwargs: Any) -> tuple[ValohaiAPI, CannedSession, list[float]]:
    sleeps: list[float] = []
    api = ValohaiAPI("vh.example", "secret", sleep=sleeps.append, **kwargs)
    session = CannedSession(answers)
    session.headers.update(api.session.headers)
    api.session = session
    return api, session, sleeps


# -- status mapping -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "detail", "state"), [
    ("created", None, RunState.QUEUED),
    ("queued", None, RunState.QUEUED),
    ("started", None, RunState.RUNNING),
    ("stopping", "Stop requested.", RunState.RUNNING),
    ("complete", None, RunState.SUCCEEDED),
    ("error", None, RunState.FAILED),
    ("crashed", None, RunState.LOST),
    ("stopped", None, RunState.CANCELLED),
    ("stopped", "Time limit exceeded", RunState.FAILED),
])
def test_every_valohai_status_maps_to_a_state(status, detail, state):
    mapped = map_status({"id": "x", "status": status, "status_detail": detail})
    assert mapped.state is state
    assert mapped.remote_state == status


def test_a_time_limit_stop_says_so():
    mapped = map_status({"status": "stopped", "status_detail": "Time limit exceeded"})
    assert "Time limit exceeded" in mapped.message


@pytest.mark.parametrize(("start_time", "state"), [(None, RunState.QUEUED), ("2026-01-01T00:00:00Z", RunState.RUNNING)])
def test_an_unknown_status_keeps_waiting_and_is_logged(caplog, start_time, state):
    with caplog.at_level(logging.WARNING):
        mapped = map_status({"id": f"e-{start_time}", "status": "hibernating", "start_time": start_time})
    assert mapped.state is state and not mapped.is_terminal
    assert "hibernating" in caplog.text


# -- request building ---------------------------------------------------------------------------------------


def test_a_valohai_step_gets_params_inputs_environment_time_limit_and_identity_tags(tmp_path):
    request = make_request(
        tmp_path, params={"alpha": 0.5, "features": "all", "grid": [1, 2], "nested": {"a": 1}},
        inputs={"dataset": "datum://d1,datum://d2", "extra": "s3://bucket/x.csv"}, outputs=["model"],
        env={"MODE": "fast"}, timeout=90.5, resources={"profile": "gpu"},
        backend_options={"valohai": {"step": "train", "tags": ["nightly"]}})
    body, data = build_execution(request, config(profiles={"gpu": {"environment": "aws-p3"}}), "p-1")
    assert body["project"] == "p-1" and body["commit"] == "main" and body["step"] == "train"
    assert body["parameters"] == {"alpha": 0.5, "features": "all", "grid": [1, 2], "nested": '{"a": 1}'}
    assert body["inputs"] == {"dataset": ["datum://d1", "datum://d2"], "extra": ["s3://bucket/x.csv"]}
    assert body["environment"] == "aws-p3"
    assert body["time_limit"] == 91
    assert f"{IDENTITY_TAG_PREFIX}{IDENTITY.digest}" in body["tags"] and "nightly" in body["tags"]
    assert "task:train" in body["tags"] and "map:2" in body["tags"]
    assert body["title"] == "ml.train[2]"
    assert body["environment_variables"]["MODE"] == "fast"
    assert "REMOTE_ML_STEP" not in body["environment_variables"]  # the YAML step's own command runs
    assert json.loads(body["environment_variables"][HANDLE_ENV]) == {
        "mode": "step", "declared_outputs": ["model"], "export": {},
        "inputs": {"dataset": "datum://d1,datum://d2", "extra": "s3://bucket/x.csv"}}
    assert data["project_id"] == "p-1" and data["mode"] == "step"


def test_the_steps_setting_maps_a_callable_to_a_valohai_step_and_commit_wins_over_branch(tmp_path):
    request = make_request(tmp_path)
    body, _ = build_execution(request, config(steps={"example_ml.steps:train": "train-v2"}, commit="abc123"), "p")
    assert body["step"] == "train-v2" and body["commit"] == "abc123"
    by_task, _ = build_execution(request, config(steps={"train": "by-task"}), "p")
    assert by_task["step"] == "by-task"


def test_the_runtime_step_carries_the_runtime_and_the_step_and_maps_inputs_to_slots(tmp_path):
    request = StepRequest.create(
        StepSpec.build(command=["python3", "-c", "print(1)"], params={"alpha": 1}, outputs=["model"],
                       inputs={"data": "datum://x", "b_first": "https://host/f.csv"}),
        IDENTITY, ArtifactStore(str(tmp_path)))
    body, data = build_execution(request, config(runtime_step="remote-ml-runtime", python_path=["dags"],
                                                 export_outputs=True), "p")
    env = body["environment_variables"]
    assert body["step"] == "remote-ml-runtime" and body["parameters"] == {}
    assert body["inputs"] == {"input-0": ["https://host/f.csv"], "input-1": ["datum://x"]}
    step = json.loads(env["REMOTE_ML_STEP"])
    assert step["params"] == {"alpha": 1} and step["outputs"] == {"model": "model"}
    assert step["valohai_input_slots"] == {"b_first": "input-0", "data": "input-1"}
    assert step["manifest_uri"] == MANIFEST_NAME and step["python_path"] == ["dags"]
    assert "def run(step" in env["REMOTE_ML_RUNTIME"] and env["REMOTE_ML_BOOTSTRAP"] == BOOTSTRAP
    assert data["export"] == {"model": request.outputs["model"]}


def test_without_a_step_the_error_names_the_option_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"backend_options\.valohai\.step.*runtime_step"):
        build_execution(make_request(tmp_path), config(), "p")


@pytest.mark.parametrize(("value", "expected"), [
    (1, 1), (0.5, 0.5), (True, True), ("x", "x"), (None, None), (["a", 2], ["a", 2]),
    ([{"a": 1}], '[{"a": 1}]'), ({"k": [1]}, '{"k": [1]}'), ([True], "[true]"),
])
def test_parameter_values(value, expected):
    assert param_value(value) == expected


def test_input_urls_split_only_datum_lists():
    assert input_urls("datum://a,datum://b") == ["datum://a", "datum://b"]
    assert input_urls("https://h/x?a=1,2") == ["https://h/x?a=1,2"]


def test_identity_tags_are_plain_and_carry_the_digest():
    tags = identity_tags(StepIdentity("my dag", "t/1", "r", -1, 0))
    assert tags[0] == f"remote-ml:{StepIdentity('my dag', 't/1', 'r').digest}"
    assert "dag:my_dag" in tags and not any(t.startswith("map:") for t in tags)


# -- validation -------------------------------------------------------------------------------------------


def backend(**overrides: Any) -> ValohaiBackend:
    return ValohaiBackend(config(**overrides), api=ValohaiAPI("vh.example", "t"))


@pytest.mark.parametrize(("spec", "cfg", "field"), [
    ({"secrets": {"DB": "creds/pw"}}, {}, "secrets"),
    ({"resources": {"gpu": 1}}, {}, "resources.gpu"),
    ({"resources": {"profile": "gpu"}}, {"profiles": {"gpu": {"node_selector": {}}}}, "profiles.gpu.node_selector"),
    ({"backend_options": {"valohai": {"step": "t", "tags": "one"}}}, {}, "backend_options.valohai.tags"),
    ({"backend_options": {"valohai": {"stepp": "x"}}}, {}, "backend_options.valohai.stepp"),
    ({"backend_options": {"valohai": {"step": "t", "environment": 5}}}, {}, "backend_options.valohai.environment"),
    ({"backend_options": {"valohai": {"step": ["t"]}}}, {}, "backend_options.valohai.step"),
    ({"backend_options": {"valohai": {"step": "t", "tags": [1]}}}, {}, "backend_options.valohai.tags"),
    ({"backend_options": {"valohai": {"step": "t", "priority": "high"}}}, {}, "backend_options.valohai.priority"),
    ({"backend_options": {"valohai": {"step": "t", "export_outputs": "maybe"}}}, {},
     "backend_options.valohai.export_outputs"),
    ({"backend_options": {"valohai": {"step": "t"}}, "inputs": {"data": "/local/x.csv"}}, {}, "inputs.data"),
    ({"backend_options": {"valohai": {"step": "t"}}}, {"request_timeout": 120}, "request_timeout"),
    ({}, {"project": None}, "project"),
    ({}, {"branch": None}, "branch"),
])
def test_validate_refuses_what_valohai_cannot_run(tmp_path, spec, cfg, field):
    spec = {"backend_options": {"valohai": {"step": "train"}}, **spec}
    with pytest.raises(ConfigError) as err:
        backend(**cfg).validate(make_request(tmp_path, **spec))
    assert field in err.value.field


def test_validate_accepts_a_gpu_step_with_a_gpu_profile(tmp_path):
    request = make_request(tmp_path, resources={"gpu": 1, "profile": "gpu"},
                           backend_options={"valohai": {"step": "train"}})
    backend(profiles={"gpu": {"environment": "aws-p3"}}).validate(request)


def test_a_backend_needs_a_token():
    with pytest.raises(ConfigError, match="token"):
        ValohaiBackend(ValohaiConfig(project="p", branch="main"))


def test_the_token_from_a_connection_never_reaches_config_json(monkeypatch):
    import airflow_remote_ml.valohai_hook as hook

    monkeypatch.setattr(hook, "backend_config_from_connection",
                        lambda conn_id: {"host": "https://vh.example", "token": "from-conn", "project": "p",
                                         "branch": "dev"})
    b = ValohaiBackend.from_config({"conn_id": "valohai_default", "branch": "main"})
    assert b.settings.token == "from-conn" and b.settings.project == "p"
    assert b.settings.branch == "main"  # explicit settings win over the connection's
    assert "from-conn" not in json.dumps(b.config_json())


# -- log cursor -----------------------------------------------------------------------------------------


def events(*messages: str, start: int = 0) -> list[dict[str, str]]:
    """Events one second apart, as the events API lists them (ordered by time)."""
    return [ev(m, start + i) for i, m in enumerate(messages)]


def ev(message: str, second: int, stream: str = "stdout") -> dict[str, str]:
    return {"stream": stream, "message": message, "time": f"2026-01-01T00:{second // 60:02d}:{second % 60:02d}.000000"}


def backend_reading(pages: list[dict[str, Any]], **settings: Any) -> tuple[ValohaiBackend, CannedSession, Any]:
    api, session, _ = api_with([response(200, page) for page in pages])
    b = ValohaiBackend(config(**settings), api=api)
    return b, session, b._handle({"id": "e1", "urls": {"display": "https://vh.example/e1/"}}, {})


def test_new_events_takes_only_what_came_after_the_cursor():
    got, cursor = new_events(events("a", "b", "c"), LogCursor())
    assert got == events("a", "b", "c")
    got, cursor = new_events(events("a", "b", "c", "d", "e"), cursor)
    assert got == events("d", "e", start=3) and cursor.shown == 5
    assert new_events(events("c", "d", "e", start=2), cursor)[0] == []


def test_a_late_event_is_shown_once_and_no_event_twice():
    """Fails with a ``total - seen`` cursor: it repeats "c" and never shows "late"."""
    b, _, handle = backend_reading([
        {"total": 3, "truncated": False, "events": [ev("a", 1), ev("b", 2), ev("c", 4)]},
        {"total": 5, "truncated": False, "events": [ev("a", 1), ev("b", 2), ev("late", 3), ev("c", 4), ev("d", 5)]},
    ])
    first = b.read_logs(handle, None)
    second = b.read_logs(handle, first.cursor)
    assert first.lines == ["a", "b", "c"]
    assert second.lines == ["late", "d"]


def test_events_listed_out_of_order_are_shown_in_time_order_once():
    b, _, handle = backend_reading([
        {"total": 3, "truncated": False, "events": [ev("b", 2), ev("a", 1), ev("c", 3)]},
        {"total": 3, "truncated": False, "events": [ev("c", 3), ev("a", 1), ev("b", 2)]},
    ])
    first = b.read_logs(handle, None)
    assert first.lines == ["a", "b", "c"]
    assert b.read_logs(handle, first.cursor).lines == []


def test_the_cursor_is_json_and_a_restarted_reader_repeats_nothing():
    page1 = {"total": 2, "truncated": False, "events": events("a", "b")}
    page2 = {"total": 3, "truncated": False, "events": events("a", "b", "c")}
    b, _, handle = backend_reading([page1])
    cursor = json.loads(json.dumps(b.read_logs(handle, None).cursor))  # trigger kwargs / task state
    restarted, _, handle = backend_reading([page2])
    assert restarted.read_logs(handle, cursor).lines == ["c"]


def test_an_older_count_cursor_is_honoured_by_reading_the_whole_log_once():
    b, session, handle = backend_reading([
        {"total": 5, "truncated": True, "events": events("c", "d", "e", start=2)},
        {"total": 5, "truncated": False, "events": events("a", "b", "c", "d", "e")},
    ], log_batch=3)
    chunk = b.read_logs(handle, 3)
    assert chunk.lines == ["d", "e"] and session.calls[1][2] == {"limit": 5}
    assert LogCursor.from_json(chunk.cursor).shown == 5


def test_a_short_page_is_followed_by_one_read_of_every_unshown_event():
    all_events = events(*[f"line {i}" for i in range(7)])
    b, session, handle = backend_reading([
        {"total": 1, "truncated": False, "events": all_events[:1]},
        {"total": 7, "truncated": True, "events": all_events[-3:]},
        {"total": 7, "truncated": True, "events": all_events},
        {"total": 7, "truncated": True, "events": all_events[-3:]},
    ], log_batch=3)
    first = b.read_logs(handle, None)
    chunk = b.read_logs(handle, first.cursor)
    assert chunk.lines == [f"line {i}" for i in range(1, 7)]
    assert session.calls[2][2] == {"limit": 7}  # 6 unshown + the 1 remembered
    assert b.read_logs(handle, chunk.cursor).lines == []


def test_the_cursor_stays_bounded_and_old_events_never_come_back():
    many = events(*[f"line {i}" for i in range(CURSOR_WINDOW + 50)])
    got, cursor = new_events(many, LogCursor())
    assert len(got) == len(many) and len(cursor.seen) == CURSOR_WINDOW
    assert len(json.dumps(cursor.to_json())) < 12_000
    assert new_events(many, cursor)[0] == []


def detail(status: str, evs: list[dict[str, str]]) -> dict[str, Any]:
    return {"id": "e1", "status": status, "events": evs}


def test_a_poll_brings_the_log_along_so_reading_it_costs_no_request():
    """Before: every wait iteration sent a status request and an events request (4/min at a 30 s cap)."""
    b, session, handle = backend_reading([
        detail("started", events("a")),
        {"total": 1, "truncated": False, "events": events("a")},  # the first read asks the events endpoint
        detail("started", events("a", "b")),
        detail("complete", events("a", "b", "c")),
    ])
    b.poll(handle)
    first = b.read_logs(handle, None)
    b.poll(handle)
    second = b.read_logs(handle, first.cursor)
    assert b.poll(handle).is_successful
    third = b.read_logs(handle, second.cursor)
    assert (first.lines, second.lines, third.lines) == (["a"], ["b"], ["c"])
    assert len(session.calls) == 4 and not session.answers
    assert [c[2] for c in session.calls if c[1].endswith("/e1/")] == [{"exclude": "metadata,outputs"}] * 3


def test_detail_events_that_do_not_overlap_the_cursor_send_the_reader_to_the_events_endpoint():
    b, session, handle = backend_reading([
        {"total": 1, "truncated": False, "events": events("a")},
        detail("started", events("y", "z", start=50)),  # a burst: only the newest events came along
        {"total": 27, "truncated": True, "events": events("y", "z", start=50)},
        {"total": 27, "truncated": False, "events": [*events("a"), *events(*"bcdefghijklmnopqrstuvwx", start=1),
                                                       *events("y", "z", start=50)]},
    ])
    first = b.read_logs(handle, None)
    b.poll(handle)
    chunk = b.read_logs(handle, first.cursor)
    assert chunk.lines == list("bcdefghijklmnopqrstuvwxyz")
    assert session.calls[3][2] == {"limit": 27}


def test_a_failure_is_explained_from_the_events_that_came_with_the_poll():
    b, session, handle = backend_reading([detail("error", [
        ev("Execution started.", 1, "status"), ev("Traceback: boom", 2, "stderr"),
        ev("Process exited with code 3. Execution failed.", 3, "status")])])
    status = b.poll(handle)
    assert (status.state, status.reason, status.exit_code) == (RunState.FAILED, "error", 3)
    assert len(session.calls) == 1


def test_event_ids_follow_valohai_cli():
    """valohai_cli/log_manager.py: md5 of '+'.join((stream, time, message))."""
    import hashlib

    event = ev("hello", 1)
    expected = hashlib.md5(f"stdout+{event['time']}+hello".encode()).hexdigest()
    assert event_id(event) == expected[:16]


def test_status_events_are_marked():
    assert event_line({"stream": "status", "message": "Execution queued."}) == "[valohai] Execution queued."
    assert event_line({"stream": "stderr", "message": "boom"}) == "boom"


# -- outputs --------------------------------------------------------------------------------------------


def test_declared_outputs_match_datums_by_name_extension_or_directory():
    datums = [{"id": "1", "name": "model"}, {"id": "2", "name": "dataset/train.csv"},
              {"id": "3", "name": "dataset/test.csv"}, {"id": "4", "name": "report.json"},
              {"id": "5", "name": "models/other"}, {"id": "6", "name": "plots/report.png"}]
    matched = match_outputs(["model", "dataset", "report", "missing"], datums)
    assert [d["id"] for d in matched["model"]] == ["1"]
    assert [d["id"] for d in matched["dataset"]] == ["3", "2"]  # sorted by name
    assert [d["id"] for d in matched["report"]] == ["4"]
    assert "missing" not in matched


# -- the HTTP choke point ---------------------------------------------------------------------------------


def test_a_field_error_is_a_config_error_naming_the_field():
    api, _, _ = api_with([response(400, {"environment": [{"message": "Object with slug x does not exist.",
                                                          "code": "does_not_exist"}]})])
    with pytest.raises(ConfigError) as err:
        api.request("POST", "executions/", json_body={})
    assert err.value.field == "valohai.environment"
    assert "does not exist" in str(err.value) and "environment slug" in str(err.value)


def test_401_names_the_connection_to_fix():
    api, _, _ = api_with([response(401, {"detail": "Invalid token."})], conn_id="valohai_prod")
    with pytest.raises(ConfigError, match="check the Valohai API token in connection 'valohai_prod'"):
        api.request("GET", "executions/e/")


def test_429_and_5xx_are_retried_honouring_retry_after_then_succeed():
    api, session, sleeps = api_with([
        response(429, {"detail": "Request was throttled."}, {"Retry-After": "7"}),
        response(503, text="<!DOCTYPE html><html><body>Service Unavailable</body></html>"),
        response(200, {"ok": True}),
    ])
    assert api.request("GET", "executions/e/") == {"ok": True}
    assert len(session.calls) == 3
    assert sleeps[0] == 7 and sleeps[1] < 7


def test_retries_are_bounded_and_the_transient_error_surfaces():
    api, session, sleeps = api_with([response(500, text="Server Error (500)")] * 3, max_retries=2)
    with pytest.raises(TransientBackendError) as err:
        api.request("GET", "executions/e/")
    assert err.value.status_code == 500 and len(session.calls) == 3 and len(sleeps) == 2


def test_retry_after_is_capped():
    api, _, sleeps = api_with([response(429, {}, {"Retry-After": "3600"}), response(200, {})], max_retry_wait=5)
    api.request("GET", "x/")
    assert sleeps == [5]


def test_a_connection_error_is_transient():
    api, _, _ = api_with([], max_retries=0)

    def broken(*args: Any, **kwargs: Any) -> requests.Response:
        raise requests.ConnectionError("connection reset by peer")

    api.session.request = broken  # type: ignore[method-assign]
    with pytest.raises(TransientBackendError, match="reset"):
        api.request("GET", "executions/")


@pytest.mark.parametrize(("status", "kind"), [(403, BackendAPIError), (404, BackendAPIError), (418, BackendAPIError)])
def test_other_refusals_are_api_errors_not_retried(status, kind):
    api, session, _ = api_with([response(status, {"detail": "no"})])
    with pytest.raises(kind) as err:
        api.request("GET", "executions/e/")
    assert not isinstance(err.value, TransientBackendError) and len(session.calls) == 1


def test_paging_follows_absolute_next_links():
    api, session, _ = api_with([
        response(200, {"count": 3, "next": "https://vh.example/api/v0/executions/?limit=2&offset=2",
                       "previous": None, "results": [{"id": 1}, {"id": 2}]}),
        response(200, {"count": 3, "next": None, "previous": "x", "results": [{"id": 3}]}),
    ])
    assert [e["id"] for e in api.paged("executions/", {"limit": 2})] == [1, 2, 3]
    assert session.calls[1][1] == "https://vh.example/api/v0/executions/?limit=2&offset=2"


def test_the_token_is_sent_as_a_drf_token_header():
    api = ValohaiAPI("https://vh.example/", "s3cret")
    assert api.session.headers["Authorization"] == "Token s3cret"
    assert api.base == "https://vh.example/api/v0/"


# -- the connection -----------------------------------------------------------------------------------------


def test_connection_fields_become_backend_settings():
    cfg = config_from_connection_fields("vh", "vh.example", None, "tok",
                                        {"project": "o/p", "profiles": {"gpu": {"environment": "g"}}})
    assert cfg == {"host": "https://vh.example", "token": "tok", "project": "o/p",
                   "profiles": {"gpu": {"environment": "g"}}}
    assert config_from_connection_fields("vh", "", None, "tok", {})["host"] == "https://app.valohai.com"
    ValohaiConfig(**cfg)  # everything it returns is a setting


def test_connection_problems_name_the_fix():
    with pytest.raises(ConfigError, match="password"):
        config_from_connection_fields("vh", "h", None, "", {})
    with pytest.raises(ConfigError, match="did you mean 'project'"):
        config_from_connection_fields("vh", "h", None, "t", {"projet": "x"})


def test_hook_metadata():
    assert (ValohaiHook.conn_type, ValohaiHook.conn_name_attr, ValohaiHook.default_conn_name,
            ValohaiHook.hook_name) == ("valohai", "valohai_conn_id", "valohai_default", "Valohai")
    ui = ValohaiHook.get_ui_field_behaviour()
    assert "login" in ui["hidden_fields"] and ui["relabeling"]["password"] == "API token"


def test_the_backend_module_never_imports_airflow():
    import subprocess
    import sys

    code = ("import sys; sys.modules['airflow'] = None\n"
            "from airflow_remote_ml.backends.valohai import ValohaiBackend\n"
            "ValohaiBackend.from_config({'token': 't', 'project': 'p', 'branch': 'main'}).close()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
