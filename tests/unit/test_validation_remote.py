"""What only the remote side knows: its refusal of a field is an InvalidRequestError (a ConfigError naming
the field), the lifecycle submits it once, and the operator fails the task once (issue 9, item 4 and "What to
build": a remote 400 on a field fails the task once as AirflowFailException)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import requests
from airflow.sdk.exceptions import AirflowFailException

from airflow_remote_ml.backends.databricks._errors import map_error
from airflow_remote_ml.backends.kubernetes._client import map_api_exception
from airflow_remote_ml.backends.local import LocalBackend
from airflow_remote_ml.core import ConfigError, InvalidRequestError, TransientBackendError
from airflow_remote_ml.operators import STATE_KEY, RemoteExecutionOperator
from tests.system.helpers import FakeTI, FileStateStore, context
from tests.unit.test_kubernetes_pod import FakeApiException


def test_a_databricks_invalid_parameter_value_is_an_invalid_request_error():
    # The Jobs API's documented error body: {"error_code": "INVALID_PARAMETER_VALUE", "message": ...}.
    response = requests.Response()
    response.status_code = 400
    response._content = json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                                    "message": "Invalid spark version 99.x-scala2.12."}).encode()
    error = map_error(requests.HTTPError(response=response), "submitting run", backend="databricks",
                      conn_id="databricks_default", ambiguous=True)
    assert isinstance(error, InvalidRequestError) and isinstance(error, ConfigError)
    assert not isinstance(error, TransientBackendError)  # a submit refused for its content is not ambiguous
    assert error.status_code == 400 and "Invalid spark version" in str(error)


def test_a_kubernetes_422_invalid_is_an_invalid_request_error():
    error = map_api_exception(FakeApiException(422, "Invalid"), "creating pod p")
    assert isinstance(error, InvalidRequestError) and isinstance(error, ConfigError)
    assert error.status_code == 422


def test_a_remote_refusal_at_submit_fails_the_task_once(tmp_path, monkeypatch):
    """The whole path: the backend's submit is refused for a field; the lifecycle does not look it up or
    submit again; the operator raises AirflowFailException (never retried), naming the field."""
    calls: list[Any] = []

    def refused(self: LocalBackend, request: Any) -> Any:
        calls.append(request.identity.key)
        raise InvalidRequestError("local", "backend_options.local.cwd", "the platform says no", 400, "fix it")

    monkeypatch.setattr(LocalBackend, "submit", refused)
    op = RemoteExecutionOperator(task_id="t", backend="local", backend_config={"state_dir": str(tmp_path / "jobs")},
                                 artifact_root=str(tmp_path / "art"), command=[sys.executable, "-c", "pass"],
                                 retries=3)
    store = FileStateStore(str(tmp_path / "state.json"))
    with pytest.raises(AirflowFailException) as info:
        op.execute(context(FakeTI(), store))
    assert isinstance(info.value, ConfigError) and info.value.field == "backend_options.local.cwd"
    assert len(calls) == 1
    assert (store.get(STATE_KEY) or {}).get("phase") != "submitted"


def test_a_backend_whose_sdk_is_missing_fails_the_task_once(tmp_path, monkeypatch):
    """BackendUnavailableError (an extra not installed) never heals by retrying either."""
    from airflow_remote_ml.core import BackendUnavailableError, registry

    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "fakeplatform", ("no_such_platform_sdk_xyz:Backend", "fakeplatform"))
    monkeypatch.setattr(registry, "_entry_points", lambda: {})
    from airflow.sdk import DAG

    with DAG("sdk_missing", schedule=None, params={"b": "fakeplatform"}) as dag:
        op = RemoteExecutionOperator(task_id="t", backend="{{ params.b }}", artifact_root=str(tmp_path / "art"),
                                     command=["true"], retries=3)
    op.render_template_fields({"params": dict(dag.params.dump())})
    with pytest.raises(AirflowFailException) as info:
        op.execute(context(FakeTI(), FileStateStore(str(tmp_path / "state.json"))))
    assert isinstance(info.value, BackendUnavailableError)
    assert "pip install 'airflow-remote-ml[fakeplatform]'" in str(info.value)
