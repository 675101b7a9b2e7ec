"""The operator's side of issue 9: a configuration error is final wherever it is raised (constructor, a
mapped task being unmapped, real Jinja rendering), and templated fields that render to the wrong type fail
once, before anything is submitted.

``AirflowFailException`` is what the task runner never retries (task-sdk ``task_runner.run``: an
``AirflowFailException`` sets the task FAILED without consulting ``retries``), so each test checks that
the error is one, and that nothing reached the backend.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException

from airflow_remote_ml.core import ConfigError
from airflow_remote_ml.operators import STATE_KEY, RemoteExecutionOperator
from tests.system.helpers import FakeTI, FileStateStore, context


@pytest.fixture
def local(tmp_path: Any) -> dict[str, Any]:
    return {"backend": "local", "backend_config": {"state_dir": str(tmp_path / "jobs")},
            "artifact_root": str(tmp_path / "art")}


def rendered(op: RemoteExecutionOperator, dag: DAG) -> RemoteExecutionOperator:
    """The operator after Airflow's own rendering of its template fields (as at the start of a try)."""
    op.render_template_fields({"params": dict(dag.params.dump())})
    return op


def assert_failed_once_before_submit(op: RemoteExecutionOperator, tmp_path: Any, field: str) -> None:
    store = FileStateStore(str(tmp_path / "state.json"))
    with pytest.raises(AirflowFailException) as info:
        op.execute(context(FakeTI(), store))
    assert isinstance(info.value, ConfigError) and info.value.field == field, info.value
    assert store.get(STATE_KEY) is None  # no intent recorded: nothing was submitted
    jobs = tmp_path / "jobs"
    assert not jobs.exists() or not os.listdir(jobs)


def test_a_config_error_while_a_mapped_task_is_unmapped_is_final(local):
    """Issue 9 item 2: the constructor runs again on the worker when a mapped task is unmapped."""
    with DAG("mapped", schedule=None):
        mapped = RemoteExecutionOperator.partial(task_id="t", command=["true"], **local).expand(
            compute=[{"memory": "1Gi"}, {"memory": "4GG"}])
    assert isinstance(mapped.unmap({"compute": {"memory": "1Gi"}}), RemoteExecutionOperator)
    with pytest.raises(AirflowFailException) as info:
        mapped.unmap({"compute": {"memory": "4GG"}})
    assert isinstance(info.value, ConfigError) and info.value.field == "compute.memory"


@pytest.mark.parametrize(("kwargs", "params", "field"), [
    ({"compute": {"memory": "{{ params.v }}"}}, {"v": "4GG"}, "compute.memory"),
    ({"timeout": "{{ params.v }}"}, {"v": "forever"}, "timeout"),
    ({"timeout": "{{ params.v }}"}, {"v": "1e10"}, "timeout"),
    ({"inputs": {"data": "{{ params.v }}"}}, {"v": "data/train.csv"}, "inputs.data"),
    ({"inputs": {"data": "{{ params.v }}"}}, {"v": "s4://bucket/x"}, "inputs.data"),
    ({"env": {"X": "{{ params.v }}"}}, {"v": "a\x00b"}, "env.X"),
    ({"image": "{{ params.v }}"}, {"v": "bad image"}, "image"),
    ({"outputs": "{{ params.v }}"}, {"v": ["model", "report"]}, "outputs"),
])
def test_a_templated_field_rendering_to_a_wrong_value_fails_once_before_submit(tmp_path, local, kwargs, params,
                                                                                 field):
    with DAG("templated", schedule=None, params=params) as dag:
        op = RemoteExecutionOperator(task_id="t", command=[sys.executable, "-c", "pass"], **kwargs, **local)
    assert_failed_once_before_submit(rendered(op, dag), tmp_path, field)


def test_templated_outputs_work_per_name_or_with_native_rendering(local):
    """Issue 9 item 3: a templated `outputs` could not work at all. Two ways that do, and the hint for the third."""
    with DAG("per_name", schedule=None, params={"name": "model"}) as dag:
        op = RemoteExecutionOperator(task_id="t", command=["true"], outputs=["{{ params.name }}"], **local)
    assert rendered(op, dag)._build_spec().outputs == ("model",)
    with DAG("native", schedule=None, params={"names": ["model", "report"]}, render_template_as_native_obj=True) as dag:
        op = RemoteExecutionOperator(task_id="t", command=["true"], outputs="{{ params.names }}", **local)
    assert rendered(op, dag)._build_spec().outputs == ("model", "report")
    with DAG("text", schedule=None, params={"names": ["model"]}) as dag:
        op = RemoteExecutionOperator(task_id="t", command=["true"], outputs="{{ params.names }}", **local)
    with pytest.raises(ConfigError) as info:
        rendered(op, dag)._build_spec()
    assert info.value.field == "outputs" and "render_template_as_native_obj=True" in (info.value.fix or "")


def test_a_backend_that_renders_to_nothing_fails_once(tmp_path, local):
    with DAG("backend", schedule=None, params={"b": ""}) as dag:
        op = RemoteExecutionOperator(task_id="t", command=["true"], **{**local, "backend": "{{ params.b }}"})
    assert_failed_once_before_submit(rendered(op, dag), tmp_path, "backend")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"outputs": "model"}, "outputs"),
    ({"parameters": {"inputs": 1}}, "parameters.inputs"),
    ({"parameters": {"outputs": 1}}, "parameters.outputs"),
    ({"inputs": {"Data": "s3://b/x", "data": "s3://b/y"}}, "inputs.data"),
    ({"outputs": ["Model", "model"]}, "outputs.model"),
    ({"backend_options": {"kuberntes": {"namespace": "ml"}}}, "backend_options.kuberntes"),
    ({"timeout": 1e10}, "timeout"),
    ({"env": {"X": "a\x00b"}}, "env.X"),
    ({"image": 123}, "image"),
])
def test_literal_mistakes_fail_at_parse_time_and_are_final(local, kwargs, field):
    with pytest.raises(AirflowFailException) as info:
        RemoteExecutionOperator(task_id="t", command=["true"], **{**local, **kwargs})
    assert isinstance(info.value, ConfigError) and info.value.field == field, info.value
