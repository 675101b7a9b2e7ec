"""The step's result is one XCom row; ``upstream.output["outputs"]["model"]`` reads into it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from airflow.sdk import DAG, Asset
from airflow.sdk.definitions.xcom_arg import PlainXComArg, serialize_xcom_arg
from airflow.sdk.exceptions import XComNotFound

from airflow_remote_ml.links import XCOM_JOB_URL_KEY, RemoteJobLink
from airflow_remote_ml.operators import RemoteExecutionOperator
from airflow_remote_ml.results import StepResultArg
from airflow_remote_ml.triggers import RemoteStepTrigger

RESULT = {"outputs": {"model": "/art/model", "report": "/art/report"}, "metrics": {"rmse": 0.3},
          "backend": "local", "job_id": "j1", "url": None}


class PullingTI:
    """The worker's task instance as XComArg.resolve uses it: ``xcom_pull`` of one key."""

    dag_id = "d"

    def __init__(self, rows: dict[str, Any]) -> None:
        self.rows = rows
        self.pulls: list[dict[str, Any]] = []

    def xcom_pull(self, **kwargs: Any) -> Any:
        self.pulls.append(kwargs)
        return self.rows.get(kwargs["key"], kwargs["default"])


def step(task_id: str, **kwargs: Any) -> RemoteExecutionOperator:
    return RemoteExecutionOperator(task_id=task_id, backend="local", command=["true"], **kwargs)


def test_the_documented_hand_off_resolves_from_the_return_value_row_alone():
    with DAG("d", start_date=datetime(2026, 1, 1), schedule=None):
        train = step("train", outputs=["model", "report"])
        evaluate = step("evaluate", inputs={"model": train.output["outputs"]["model"]})
    arg = evaluate.inputs["model"]
    ti = PullingTI({"return_value": RESULT})  # no "model", "outputs" or "metrics" rows
    assert arg.resolve({"ti": ti}) == "/art/model"
    assert train.output["metrics"]["rmse"].resolve({"ti": ti}) == 0.3
    assert train.output.resolve({"ti": ti}) == RESULT
    assert {pull["key"] for pull in ti.pulls} == {"return_value"}
    assert evaluate.upstream_task_ids == {"train"}


def test_airflows_own_xcomarg_would_need_a_row_per_output():
    """Why StepResultArg exists: PlainXComArg's [] names another XCom row (the last key wins)."""
    with DAG("d", start_date=datetime(2026, 1, 1), schedule=None):
        train = step("train", outputs=["model"])
    plain = PlainXComArg(train)["outputs"]["model"]
    assert plain.key == "model"
    with pytest.raises(XComNotFound):
        plain.resolve({"ti": PullingTI({"return_value": RESULT})})


def test_serialized_it_is_a_plain_reference_to_the_return_value():
    with DAG("d", start_date=datetime(2026, 1, 1), schedule=None):
        train = step("train", outputs=["model"])
    arg = train.output["outputs"]["model"]
    assert isinstance(arg, StepResultArg) and isinstance(arg, PlainXComArg)
    assert serialize_xcom_arg(arg) == {"task_id": "train", "key": "return_value"}
    assert str(arg) == "{{ task_instance.xcom_pull(task_ids='train', dag_id='d')['outputs']['model'] }}"


def test_a_missing_output_names_what_the_result_has():
    with DAG("d", start_date=datetime(2026, 1, 1), schedule=None):
        train = step("train", outputs=["model"])
    with pytest.raises(XComNotFound, match=r"\['outputs'\]\['modle'\] \(it has \['model', 'report'\]\)"):
        train.output["outputs"]["modle"].resolve({"ti": PullingTI({"return_value": RESULT})})


def test_mapping_over_a_key_of_the_result_is_refused_but_over_the_result_works():
    with DAG("d", start_date=datetime(2026, 1, 1), schedule=None):
        train = step("train", outputs=["model"])
    with pytest.raises(ValueError, match="cannot map over a key"):
        train.output["outputs"].map(len)
    assert train.output.map(len) is not None


def test_the_link_reads_the_row_the_operator_writes_under_airflows_link_key():
    assert RemoteJobLink().xcom_key == XCOM_JOB_URL_KEY == "_link_RemoteJobLink"

    class Renamed(RemoteJobLink):
        pass

    assert Renamed().xcom_key == XCOM_JOB_URL_KEY


def test_a_success_may_end_in_the_triggerer_unless_a_worker_has_something_to_do():
    with DAG("d", start_date=datetime(2026, 1, 1), schedule=None):
        plain = step("plain", deferrable=True)
        with_outlet = step("with_outlet", deferrable=True, outlets=[Asset("s3://bucket/model")])
        feeds_a_mapping = step("feeds_a_mapping", deferrable=True)
        RemoteExecutionOperator.partial(task_id="mapped", backend="local", command=["true"]).expand(
            parameters=feeds_a_mapping.output)

    class Audited(RemoteExecutionOperator):
        def execute_complete(self, context, event):
            return super().execute_complete(context, event)

    audited = Audited(task_id="audited", backend="local", command=["true"], deferrable=True)
    assert plain._may_end_in_triggerer()
    assert not with_outlet._may_end_in_triggerer()
    assert not feeds_a_mapping._may_end_in_triggerer()
    assert not audited._may_end_in_triggerer()


def test_the_triggers_ending_flags_survive_its_serialization():
    handle = {"backend": "local", "job_id": "j1", "url": None, "data": {}}
    trigger = RemoteStepTrigger(backend="local", backend_config={}, handle=handle, end_task=True, push_result=False)
    _, kwargs = trigger.serialize()
    rebuilt = RemoteStepTrigger(**kwargs)
    assert (rebuilt.end_task, rebuilt.push_result) == (True, False)
    assert RemoteStepTrigger(backend="local", backend_config={}, handle=handle).end_task is False
